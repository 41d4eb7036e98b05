"""External guard baseline: the base model as a separate sequence classifier.

What a user would otherwise deploy (Llama-Guard / Qwen3Guard-Stream style): a second model that
re-reads the whole prompt + response text every ``k`` generated tokens with its own forward
pass and its own head. Here it is the plain base model (its own copy of the weights, no LoRA)
with a logistic-regression head on the final-norm hidden state of the last token, fitted on
features of the same training pool the ESS checkpoint used (a linear probe: the cheapest guard
that is still trained, our choice for a CPU budget).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GUARD_CONFIG = "guard_config.json"
GUARD_WEIGHTS = "guard_head.safetensors"


@dataclass
class Guard:
    """``score(ids) -> p_malicious`` for a whole text; one full forward per call."""

    body: torch.nn.Module
    """A ``LlamaModel`` (final norm included)."""
    weight: torch.Tensor
    """``(H,)`` logistic-regression weights."""
    bias: float
    threshold: float = 0.5

    @torch.inference_mode()
    def features(self, ids: list[list[int]]) -> torch.Tensor:
        """Last-token hidden states ``(B, H)`` float32 on the CPU, of right-padded texts (the
        body runs on its own device)."""
        B, L = len(ids), max(len(x) for x in ids)
        batch = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        dev = next(self.body.parameters()).device
        hidden = self.body(input_ids=batch.to(dev), attention_mask=mask.to(dev)).last_hidden_state
        last = torch.tensor([len(x) - 1 for x in ids], device=dev)
        # the regression is float32 whatever the body's dtype
        return hidden[torch.arange(B, device=dev), last].float().cpu()

    def scores(self, ids: list[list[int]]) -> list[float]:
        """p_malicious of each prompt + response text (token ids, chat template included)."""
        return torch.sigmoid(self.features(ids) @ self.weight + self.bias).tolist()

    def score(self, ids: list[int]) -> float:
        """p_malicious of one prompt + response text (token ids, chat template included)."""
        return self.scores([ids])[0]


def load_base_body(base_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).model.eval()


def load_guard(guard_dir: str | Path, base_dir: str | Path, body: torch.nn.Module | None = None) -> Guard:
    """The guard head on ``body`` (default: a fresh copy of the base model's body, as a separate
    deployment would hold; pass the plain base model's ``.model`` to share its weights).

    Raises:
        FileNotFoundError: the guard was not trained (`train_guard`).
    """
    from safetensors.torch import load_file

    cfg = json.loads((Path(guard_dir) / GUARD_CONFIG).read_text())
    w = load_file(str(Path(guard_dir) / GUARD_WEIGHTS))
    return Guard(body if body is not None else load_base_body(base_dir), w["weight"],
                 float(w["bias"]), cfg["threshold"])


GUARD_PROMPT_TOKENS = 256
"""The guard reads the last this many prompt tokens (chat template included) before the
response (our choice: the budget it was trained with)."""


def guard_input(prompt_ids, response_ids) -> list[int]:
    """Token ids the guard scores for a prompt and the response so far."""
    return list(prompt_ids)[-GUARD_PROMPT_TOKENS:] + list(response_ids)


def guard_texts(tokenizer, examples, max_response_tokens: int = 48) -> tuple[list[list[int]], list[int]]:
    """Token ids of (query, response head) chat texts and their labels (malicious if either
    the query or the response is labelled malicious)."""
    from safety_training.formats import example_prompt

    ids, labels = [], []
    for e in examples:
        p = example_prompt(tokenizer, e)  # the example's format, as the recipe encodes it
        resp = tokenizer(e.response, add_special_tokens=False)["input_ids"][:max_response_tokens] if e.response else []
        ids.append(guard_input(p.ids, resp))
        labels.append(int(e.query_label == 1 or e.response_label == 1))
    return ids, labels


def train_guard(examples, tokenizer, base_dir: str | Path, out_dir: str | Path,
                batch_size: int = 16, log=print, manifest: dict | None = None) -> dict:
    """Fit the guard head on frozen base-model features; returns validation metrics.

    ``manifest`` (`data.build_examples`) is saved beside the weights, naming the data mix."""
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression
    from tqdm import tqdm

    from safety_training.metrics import classification_metrics

    ids, labels = guard_texts(tokenizer, examples)
    guard = Guard(load_base_body(base_dir), torch.zeros(1), 0.0)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    feats = torch.zeros(len(ids), guard.body.config.hidden_size)
    for s in tqdm(range(0, len(order), batch_size), desc="guard features", mininterval=10):
        idx = order[s:s + batch_size]
        feats[idx] = guard.features([ids[i] for i in idx])
    n_val = len(ids) // 10
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(feats[n_val:].numpy(), labels[n_val:])
    probs = clf.predict_proba(feats[:n_val].numpy())[:, 1].tolist()
    metrics = classification_metrics(labels[:n_val], probs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.tensor(clf.coef_[0], dtype=torch.float32).contiguous(),
               "bias": torch.tensor(float(clf.intercept_[0]))}, str(out / GUARD_WEIGHTS))
    (out / GUARD_CONFIG).write_text(json.dumps(
        {"base": "plain base model, last-token final-norm features", "threshold": 0.5,
         "n_train": len(ids) - n_val, "validation": metrics, "data_manifest": manifest}, indent=2) + "\n")
    log(f"guard validation: {json.dumps(metrics)}")
    return metrics
