"""Training and evaluation of expert pools + routers on a frozen backbone (`python -m train`)."""
