"""`/metrics`: the engines' figures in the Prometheus text format (prometheus_client)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from adafuse_jax.serving.engine import Engine


class _Collector:
  def __init__(self, engines: Mapping[str, Engine], http_counts: Mapping[tuple[str, str], int]):
    self.engines, self.http_counts = engines, http_counts

  def collect(self):
    p = "adafuse_"
    http = CounterMetricFamily(p + "http_requests", "HTTP requests answered", labels=["path", "status"])
    for (path, status), n in sorted(self.http_counts.items()):
      http.add_metric([path, status], n)
    yield http
    finished = CounterMetricFamily(p + "requests", "Requests finished",
                                   labels=["model", "finish_reason"])
    engine_time = CounterMetricFamily(
        p + "engine_seconds", "The engine thread's time: waiting for the device's results"
        " (device_wait), working on the host (host), with no request to serve (idle)",
        labels=["model", "state"])
    counters = {
        "prompt_tokens": ("Prompt tokens prefilled", "prompt_tokens"),
        "generation_tokens": ("Tokens generated", "generated_tokens"),
        "decode_steps": ("Decode steps run", "decode_steps"),
        "packed_prefill_passes": ("Prefill passes of whole prompts packed end to end",
                                  "packed_passes"),
        "row_prefill_passes": ("Prefill passes of prompt chunks, one row each", "row_passes"),
        "mixed_steps": ("Decode steps that also prefilled whole prompts", "mixed_steps"),
        "prefill_waits": ("Decode steps run while new prompts waited for more to share their"
                          " prefill pass", "prefill_waits"),
        "prefill_computed_tokens": ("Prompt tokens the prefill passes computed, padding to their"
                                    " compiled sizes included", "prefill_computed_tokens"),
        "memory_errors": ("Prefill passes or decode steps the device had no memory for (the"
                          " requests in them ended with an error)", "memory_errors"),
    }
    gauges = {
        "running_sequences": "Requests holding a batch row",
        "waiting_sequences": "Requests queued for a row",
        "batch_occupancy": "Rows in use / rows computed in the latest decode step",
        "batch_bucket": "Rows computed in the latest decode step (the compiled batch size)",
        "tokens_per_second": "Tokens generated per second over the last 10 s",
        "switch_rate": "Share of rows whose expert set changed in the latest step",
        "distinct_experts": "Distinct experts the latest step's rows used",
        "time_to_first_token_p50_seconds": "Median time to first token of the last 1024 requests",
    }
    cfam = {k: CounterMetricFamily(p + k, doc, labels=["model"]) for k, (doc, _) in counters.items()}
    gfam = {k: GaugeMetricFamily(p + k, doc, labels=["model"]) for k, doc in gauges.items()}
    for name, e in self.engines.items():
      st = e.stats
      for reason, n in sorted(st.requests_finished.items()):
        finished.add_metric([name, reason], n)
      for state in ("device_wait", "host", "idle"):
        engine_time.add_metric([name, state], getattr(st, state + "_s"))
      for k, (_, attr) in counters.items():
        cfam[k].add_metric([name], getattr(st, attr))
      ttft = list(st.ttft_s)
      values = {"running_sequences": st.running, "waiting_sequences": st.waiting,
                "batch_occupancy": st.last_occupancy, "batch_bucket": st.last_bucket,
                "tokens_per_second": st.tokens_per_s(), "switch_rate": st.switch_rate,
                "distinct_experts": st.distinct_experts,
                "time_to_first_token_p50_seconds": float(np.median(ttft)) if ttft else 0.0}
      for k, v in values.items():
        gfam[k].add_metric([name], v)
    yield finished
    yield engine_time
    yield from cfam.values()
    yield from gfam.values()


def metrics_text(engines: Mapping[str, Engine], http_counts: Mapping[tuple[str, str], int]) -> bytes:
  registry = CollectorRegistry(auto_describe=False)
  registry.register(_Collector(engines, http_counts))
  return generate_latest(registry)
