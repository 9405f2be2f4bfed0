"""`python -m adafuse_jax.train chat-mix`: the backbone's own chats as training text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adafuse_jax.train import chat


def test_documents_split_a_stream_at_eos():
  stream = np.array([5, 6, 2, 2, 7, 2, 8, 9], np.uint16)
  assert [d.tolist() for d in chat.documents(stream, 2)] == [[5, 6], [7]]


@pytest.mark.parametrize("domain, text, question", [
    ("computing", "Tcl: <language> Tool Command Language.", "What is Tcl in computing?"),
    ("computing", "{operand}: that is the number", None),  # a fragment, not an entry
    ("definitions", "food, nutrient (noun): any substance", 'What does the word "food" mean?'),
    ("math", "Question: What is 2 + 3?\nAnswer: 5", "What is 2 + 3?"),
    ("quotes", "   ", None),
])
def test_questions_are_built_from_a_domains_documents(domain, text, question):
  assert chat._question(domain, text) == question


def test_self_distilled_chats_are_whole_turns_in_the_template(default_model):
  tok = default_model.tokenizer
  chats = chat.self_distilled_chats(default_model.model, tok,
                                    [("math", "What is 3 + 4?"), ("quotes", "Say hello.")],
                                    max_new_tokens=40, progress=False)
  assert chats, "the backbone ended none of its turns"
  for c in chats:
    assert c["reply"] and c["text"].endswith(c["reply"] + "<|im_end|>\n")
    ids = tok.encode(c["text"])
    # The turn markers are single special tokens again when the training data is tokenized.
    assert ids.count(tok.token_to_id("<|im_end|>")) == 3  # system, user, assistant
    assert json.loads(json.dumps(c)) == c
