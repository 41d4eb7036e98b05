"""Training recipe: joint LM + [CLS] classification loss with the strategic-attention masks.

Loss (docs/method.md, "Training objective")::

    loss = CE(LM logits, response tokens) + lambda_cls * BCE([CLS] and probe logits, labels)
           + kl_to_base * KL(base model || LM) on the rows that start or continue a benign answer

(the last term is ours, off by default: docs/method.md, "Decision 18").

The ``[CLS]`` slot is labelled with the query label. Response-window probes (extra ``PROBE``
slots at the end of a sequence that read the query plus a window of response tokens, exactly as
a decode-time re-check does) are labelled 1 for harmful continuations and 0 for benign answers
and refusals. Parameters trained: LoRA (peft) on every projection, the [CLS] embedding row and
the head.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import yaml

from .contrast import contrast_examples, load_pairs
from .data import SHAREGPT_CALIBRATION, Example, ReasonStyle, build_examples, with_reason_style
from .datasets import default_data_dir
from .formats import Format, assign_formats, example_prompt, parse_formats
from .metrics import classification_metrics, held_out_metrics
from .refusals import is_refusal
from .sharegpt import Rule
from .splits import Splits, split_examples
from safety_decoding.layout import CLS_SLOT, SlotBatch, SlotLayout, sequence_layout, stack_layouts
from safety_decoding.model import ADAPTER_DIR, REFUSAL_COMPLETION, SafetyConfig, SafetyModel, load_safety_weights
from safety_decoding.prompt import build_chat_prompt
from safety_decoding.types import LoraRows


class KlRows(str, Enum):
    """Which rows `kl_to_base` pins to the base model (`kl_rows`; docs/method.md, "Decision 18")."""

    ANSWERS = "answers"
    """The row that starts every answer and every row of a benign answer (the fifteenth run)."""
    START = "start"
    """Only the row that starts every answer, where a learned refusal begins: the least the
    term needs to hold for "only the signal refuses", leaving the benign answers' token states
    free for what ``[CLS]`` reads."""


@dataclass
class TrainConfig:
    """``ess train --config`` YAML keys; defaults are the shipped run's."""

    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    """The safety data (default: where `ess data fetch` puts it)."""
    output_dir: str = "checkpoints/smollm2-135m-ess"
    seed: int = 42
    data_order_seed: int | None = None
    """Seed of the batch order alone (None: ``seed``). Our choice, for warm starts: the splits
    follow ``seed``, so a second run over the same data keeps its held-out sets clean while
    seeing its batches in a new order (a run cut by ``max_minutes`` sees other batches)."""
    n_benign: int = 900
    n_benign_query_only: int = 1400
    n_malicious: int = 800
    n_malicious_query_only: int = 1200
    n_harmful_probe: int = 240
    n_jailbreak: int = 60
    sharegpt_limit: int = 3000
    reframes_per_core: int = 3
    n_everyday: int = 0
    lookalikes_per_item: int = 0
    n_roleplay: int = 0
    n_noisy: int = 0
    n_jailbreak_query_only: int = 0
    n_narrative: int = 0
    n_surface: int = 0
    """Query-only prompts of each class with their letters' case scrambled or written in
    Cyrillic look-alikes (`augment.surface_variant`): disguises the normalizer leaves to the head."""
    self_answers_per_class: int = 0
    """Query-only examples of each class that get the base model's own greedy answer as a
    probed response (`with_self_answers`)."""
    self_answer_sources: tuple = ()
    """Sources answered first (`with_self_answers`); the rest of the quota is drawn at random."""
    self_answer_lm_loss: bool = False
    """Benign self answers that are not refusals also get LM loss (`with_self_answers`)."""
    lora_rows: str = "all"
    """`types.LoraRows`: ``all`` (the paper: LoRA on every row, LM loss on the responses) or
    ``safety`` (LoRA on the ``[CLS]`` and probe rows only; token rows are the frozen base model
    and never read ``[CLS]``, so no LM loss trains and the server writes the whole refusal;
    docs/method.md, "Decision 17")."""
    kl_to_base: float = 0.0
    """Weight of the distillation term: KL from the frozen base model's next-token distribution
    to the LM's on the row that starts every answer and on every row of a benign answer
    (`kl_rows`), so the adapter may shape what ``[CLS]`` reads while the LM answers as the base
    model does (docs/method.md, "Decision 18"). 0: off. Needs ``lora_rows: all``."""
    kl_rows: str = KlRows.ANSWERS.value
    """`KlRows`: the rows the ``kl_to_base`` term covers (``answers`` or ``start``)."""
    refusal_reasons: str = "sentences"
    """Explanations after the inserted refusal (`data.ReasonStyle`): ``sentences`` (shipped),
    ``clauses`` (no sentence that refuses by itself) or ``none`` (no refusal text trains; the
    checkpoint's server writes the whole refusal, `model.REFUSAL_COMPLETION`)."""
    held_out_percent: int = 20
    validation_fraction: float = 0.1
    max_query_tokens: int = 160
    max_response_tokens: int = 48
    probes_per_example: int = 1
    probe_window: tuple = (5, 15)
    epochs: int = 1
    batch_size: int = 8
    lr: float = 3e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    lambda_cls: float = 0.5
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_minutes: float = 45.0
    """Minutes of training steps in this invocation (a resumed run gets them again)."""
    max_steps: int = 0
    """Optimizer steps in all, a resumed run's earlier steps included; 0: every batch. Unlike
    ``max_minutes`` it does not depend on the machine's speed. The learning-rate schedule spans
    every batch either way, so a capped run is the first part of the full one."""
    threads: int = 0
    bf16_autocast: bool = False
    """Forward and backward under CPU bfloat16 autocast (fp32 master weights and optimizer
    state). Our choice for CPUs with AMX or AVX512-BF16: 1.4x faster a step there (2.2 -> 1.55 s
    on one batch of 8). Leave it off on AVX2-only CPUs, where bfloat16 is emulated: a step of
    8 x 120 tokens took over 30 s there against 13 s in float32."""
    # Off unless set: with these at their defaults the data is the shipped run's.
    contrast_dir: str | list | None = None
    """Contrast pairs to train on (`contrast.load_pairs`): a folder (``data/contrast``), one
    ``.jsonl`` file, or a list of both (e.g. some files of ``data/contrast_long``); None: none."""
    contrast_holdout_categories: tuple = ()
    """Contrast categories kept out of training, for the category-held-out set (`splits`)."""
    contrast_calibration_percent: int = 0
    """Share of contrast pairs (by a hash of the id) kept out for the calibration set."""
    contrast_refusal_percent: int = 0
    """Share of harmful contrast requests answered by the inserted refusal (else query-only)."""
    holdout_sources: tuple = ()
    """Sources (`Example.source`) kept out of training, for the source-held-out set."""
    holdout_whole_sources: tuple = ()
    """Pool sources (e.g. ``harmbench-val``) whose every row leaves the training pools and comes
    back query-only as ``<name>-query-only`` (`data.build_examples`); list that name in
    ``holdout_sources`` to measure on the whole source."""
    holdout_source_shares: dict = field(default_factory=dict)
    """``{source: percent}``: that share of a source's queries (by a hash) joins the
    source-held-out set; the rest trains (`splits.split_examples`)."""
    calibration_fpr: float = 0.01
    """Target false-positive rate on the calibration set's benign side (`held_out_metrics`)."""
    threshold_from_calibration: bool = False
    """Ship the threshold the calibration set gives for ``calibration_fpr`` in the checkpoint's
    config (else 0.5)."""
    formats: tuple = ("chat",)
    """Request formats (`formats.Format`) dealt to every source; a repeated name weighs more."""
    sharegpt_filter: str = "words"
    """ShareGPT rule (`sharegpt.Rule`): ``words`` (shipped) or ``strict``."""
    sharegpt_max_chars: int = 400
    """Longest ShareGPT first turn kept, in characters."""
    sharegpt_calibration_percent: int = 0
    """Share of the kept ShareGPT first turns (by a hash of the prompt) never trained on and
    added to the calibration set's benign side (`data.in_sharegpt_calibration`)."""
    seen_configs: tuple = ()
    """Training configs of the runs a warm start descends from: their queries are dropped from
    the held-out and calibration sets (`seen_queries`), so those sets stay unseen by the chain."""
    init_checkpoint: str | None = None
    """Start from this checkpoint's LoRA, [CLS] row and head instead of a fresh LoRA and a zero
    head (a warm start: the new data is learned on top of a shipped run); None: from scratch."""
    save_every_steps: int = 0
    """Write the model so far to ``<output_dir>.partial`` every so many steps (0: never), so a
    killed run leaves a loadable checkpoint; removed once the final checkpoint is written."""
    log_every_steps: int = 50
    """Log the step time, elapsed minutes and losses every so many steps."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        parse_formats(self.formats)
        _check_choice("sharegpt_filter", self.sharegpt_filter, Rule)
        _check_choice("refusal_reasons", self.refusal_reasons, ReasonStyle)
        _check_choice("lora_rows", self.lora_rows, LoraRows)
        _check_choice("kl_rows", self.kl_rows, KlRows)
        if self.kl_to_base < 0:
            raise ValueError(f"kl_to_base: must be >= 0, got {self.kl_to_base}")
        if self.kl_to_base and LoraRows(self.lora_rows) is not LoraRows.ALL:
            raise ValueError("kl_to_base: needs lora_rows: all (with safety rows only the LM is the base model)")
        if not 0 <= self.calibration_fpr < 1:
            raise ValueError(f"calibration_fpr: must be in [0, 1), got {self.calibration_fpr}")


def _check_choice(key: str, value: str, choices: type[Enum]) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is one of ``choices``' values."""
    if value not in {c.value for c in choices}:
        raise ValueError(f"{key}: unknown value {value!r}; known: {[c.value for c in choices]}")


@dataclass
class Batch:
    ids: torch.Tensor          # (B, L)
    kinds: torch.Tensor        # (B, L)
    positions: torch.Tensor    # (B, L)
    mask: torch.Tensor         # (B, 1, L, L) bool
    lm_rows: torch.Tensor      # (N, 2) batch, slot of rows whose output predicts a target
    lm_targets: torch.Tensor   # (N,)
    cls_rows: torch.Tensor     # (M, 2) batch, slot of CLS / PROBE rows
    cls_targets: torch.Tensor  # (M,) float
    cls_is_probe: torch.Tensor  # (M,) bool
    kl_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))  # (K, 2)
    plain: SlotBatch | None = None
    """The same token slots with no ``[CLS]`` and no probes: the base model's input (`kl_rows`)."""


class Losses(NamedTuple):
    """What `compute_loss` returns (scalars, and the head's logits ``(M,)``)."""

    total: torch.Tensor
    lm: torch.Tensor
    cls: torch.Tensor
    kl: torch.Tensor
    cls_logits: torch.Tensor


def training_examples(cfg: TrainConfig):
    """`data.build_examples` with the config's mix, contrast pairs included, each example given
    its format (`formats.assign_formats`): ``(examples, manifest)``. Held-out sets are split off
    later (`split`)."""
    extra = []
    if cfg.contrast_dir:
        paths = [cfg.contrast_dir] if isinstance(cfg.contrast_dir, str) else cfg.contrast_dir
        extra = contrast_examples([p for path in paths for p in load_pairs(path)], cfg.seed,
                                  cfg.contrast_refusal_percent)
    examples, manifest = build_examples(
        Path(cfg.data_dir), n_benign=cfg.n_benign, n_benign_query_only=cfg.n_benign_query_only,
        n_malicious=cfg.n_malicious, n_malicious_query_only=cfg.n_malicious_query_only,
        n_harmful_probe=cfg.n_harmful_probe, n_jailbreak=cfg.n_jailbreak,
        sharegpt_limit=cfg.sharegpt_limit, held_out_percent=cfg.held_out_percent, seed=cfg.seed,
        reframes_per_core=cfg.reframes_per_core, n_everyday=cfg.n_everyday,
        lookalikes_per_item=cfg.lookalikes_per_item, n_roleplay=cfg.n_roleplay,
        n_noisy=cfg.n_noisy, n_jailbreak_query_only=cfg.n_jailbreak_query_only,
        n_narrative=cfg.n_narrative, n_surface=cfg.n_surface, sharegpt_filter=Rule(cfg.sharegpt_filter),
        sharegpt_max_chars=cfg.sharegpt_max_chars,
        sharegpt_calibration_percent=cfg.sharegpt_calibration_percent,
        holdout_whole_sources=cfg.holdout_whole_sources, extra=extra)
    if list(cfg.formats) != ["chat"]:
        manifest["formats"] = list(cfg.formats)
    examples = with_reason_style(examples, ReasonStyle(cfg.refusal_reasons))
    return assign_formats(examples, cfg.formats, cfg.seed), manifest


def seen_queries(config_paths) -> frozenset[str]:
    """The queries that the runs of the configs at ``config_paths`` trained on (the train split
    each config's own held-out keys leave; what a warm-start chain has seen)."""
    out = set()
    for p in config_paths:
        cfg = load_train_config(p)
        out.update(e.query for e in split(training_examples(cfg)[0], cfg, frozenset()).train)
    return frozenset(out)


def split(examples: list[Example], cfg: TrainConfig, seen: frozenset[str] | None = None) -> Splits:
    """`splits.split_examples` with the config's held-out keys; ``seen`` defaults to the queries
    of ``cfg.seen_configs``."""
    return split_examples(examples, cfg.validation_fraction, holdout_sources=cfg.holdout_sources,
                          holdout_categories=cfg.contrast_holdout_categories,
                          calibration_percent=cfg.contrast_calibration_percent,
                          holdout_source_shares=cfg.holdout_source_shares,
                          seen=seen_queries(cfg.seen_configs) if seen is None else seen)


@torch.inference_mode()
def self_answers(lm, tok, queries: list[str], max_new_tokens: int, batch_size: int = 32,
                 autocast: bool = False) -> list[str]:
    """Greedy answers of ``lm`` to each query, rendered with `build_chat_prompt` as the server does.

    Args:
        lm: a causal LM (the base model, before LoRA).
        queries: user messages; batched by length (left padding) for speed.
        max_new_tokens: answer length cap in tokens.
        autocast: run under CPU bfloat16 autocast.

    Returns:
        One answer per query, in input order, special tokens stripped.
    """
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [list(build_chat_prompt(tok, [{"role": "user", "content": q}]).ids) for q in queries]
    order = sorted(range(len(queries)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(queries)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            gen = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad)
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
    return out


def with_self_answers(examples: list[Example], answer, n_per_class: int,
                      rng: random.Random, prefer: tuple = (),
                      benign_lm_loss: bool = False) -> tuple[list[Example], dict]:
    """Give ``n_per_class`` query-only examples of each class their base model's own answer.

    The decode-time re-checks read the model's own continuations, while the probe otherwise
    trains on reference answers and AdvBench strings only. Our choice: the base model's greedy
    answers to training prompts become probe windows labelled with the query label (a benign
    answer about killing a process is benign; compliance with a harmful request is harmful),
    never with LM loss. A malicious prompt whose answer `refusals.is_refusal` reads as a refusal
    stays query-only: a refusal is not harmful text.

    Args:
        answer: ``list[str] -> list[str]``, e.g. `self_answers` bound to the base model.
        prefer: sources whose examples fill each class's quota first, e.g. the look-alike,
            role-play and narrative prompts of both classes: the probe then sees benign
            answers on frightening topics (labelled 0) beside compliance under a disguise
            (labelled 1). Measured on two runs (800 per class, these sources, seeds 42 and
            7): response-stage trips on XSTest safe prompts fell from 54 to 29 and 30 of 250.
            The fourth shipped checkpoint (seed 7) uses it.
        benign_lm_loss: benign answers that `refusals.is_refusal` does not read as refusals
            also get LM loss: the base model's own behaviour on everyday prompts, replayed so
            that the LoRA does not drift towards refusing them (docs/method.md, "Decision 10:
            refusals start only by insertion"). Malicious answers never get LM loss.

    Returns:
        ``(examples, counts)``: the same examples, some now with responses, and the counts
        ``{"benign", "malicious", "skipped"}`` (skipped: empty answers and refusals).
    """
    picked: list[int] = []
    for label in (0, 1):
        pool = [i for i, e in enumerate(examples) if e.query_label == label and not e.response
                and e.response_label is None and len(e.query) <= 1000]
        first = [i for i in pool if examples[i].source in prefer]
        rest = [i for i in pool if examples[i].source not in prefer]
        take = rng.sample(first, min(n_per_class, len(first)))
        picked += take + rng.sample(rest, min(n_per_class - len(take), len(rest)))
    answers = answer([examples[i].query for i in picked])
    out = list(examples)
    counts = {"benign": 0, "malicious": 0, "skipped": 0}
    for i, a in zip(picked, answers):
        e = examples[i]
        if not a or (e.query_label == 1 and is_refusal(a)):
            counts["skipped"] += 1
            continue
        lm_loss = benign_lm_loss and e.query_label == 0 and not is_refusal(a)
        out[i] = replace(e, response=a, response_label=e.query_label, lm_loss=lm_loss,
                         source=e.source + "-self-answer")
        counts["malicious" if e.query_label else "benign"] += 1
    return out, counts


def encode_example(tok, ex: Example, cfg: TrainConfig, rng: random.Random) -> dict:
    """Lay out one example as slots: [CLS] + prompt + response + probes; the prompt is the
    example's format as the server builds it (`formats.example_prompt`)."""
    prompt = example_prompt(tok, ex)
    ids = list(prompt.ids)
    qmask = list(prompt.query_mask)
    if sum(qmask) > cfg.max_query_tokens:  # keep the head and the tail of long (jailbreak) queries
        qpos = [i for i, q in enumerate(qmask) if q]
        drop = set(qpos[cfg.max_query_tokens // 2: len(qpos) - cfg.max_query_tokens // 2])
        keep = [i for i in range(len(ids)) if i not in drop]
        shift = sum(1 for i in drop if i < prompt.response_start)
        ids, qmask = [ids[i] for i in keep], [qmask[i] for i in keep]
        response_start = prompt.response_start - shift
    else:
        response_start = prompt.response_start
    resp = tok(ex.response, add_special_tokens=False)["input_ids"] if ex.response else []
    if len(resp) < cfg.max_response_tokens and ex.response:
        resp = resp + [tok.convert_tokens_to_ids("<|im_end|>")]
    resp = resp[: cfg.max_response_tokens]
    lm_trains = LoraRows(cfg.lora_rows) == LoraRows.ALL
    text = sequence_layout(ids, qmask, resp, tokens_read_cls=lm_trains)  # [CLS] + prompt + response
    # probe windows over the response slots, the prefill text included
    resp_lo, resp_hi = text.prompt_slot(response_start), len(text)
    windows = []
    if ex.response_label is not None and resp_hi > resp_lo:
        for _ in range(cfg.probes_per_example):
            r = rng.randint(*cfg.probe_window)
            hi = rng.randint(min(resp_lo + r, resp_hi), resp_hi)
            windows.append((max(resp_lo, hi - r), hi))
    layout = text.with_probes(len(windows))
    # the row before each response token predicts it
    lm_loss = ex.lm_loss and lm_trains
    lm_rows = [layout.response_slot(j) - 1 for j in range(len(resp))] if lm_loss else []
    kl = bool(cfg.kl_to_base) and lm_trains
    return dict(layout=layout, slots=layout.ids, kinds=layout.kinds, lm_rows=lm_rows,
                lm_targets=list(resp) if lm_loss else [],
                kl_rows=kl_rows(text, response_start, ex.query_label == 0 and cfg.kl_rows == KlRows.ANSWERS)
                if kl else [],
                plain=sequence_layout(ids, qmask, resp, cls=False) if kl else None,
                cls_rows=[CLS_SLOT, *layout.probe_slots],
                cls_targets=[float(ex.query_label)] + [float(ex.response_label) for _ in windows],
                is_probe=[False] + [True] * len(windows), windows=windows)


def kl_rows(layout: SlotLayout, response_start: int, whole_answer: bool) -> list[int]:
    """Slots whose next-token distribution `kl_to_base` pins to the base model's.

    The row that predicts the first token of the assistant turn (the last prompt row, or the one
    before a prefill), where a learned refusal would start; with ``whole_answer`` (a benign
    example under `KlRows.ANSWERS`) also every row that predicts a later response token (prefill
    included). Harmful answers are left to the other losses. docs/method.md, "Decision 18".

    Args:
        layout: the example's ``[CLS]`` + prompt + response layout.
        response_start: first prompt index of the prefill (`prompt.Prompt.response_start`;
            the prompt length when there is none).
    """
    first = layout.prompt_slot(response_start) - 1
    last = layout.response_slot(layout.response_len) - 1  # the last token predicts nothing
    return list(range(first, max(last, first + 1) if whole_answer else first + 1))


def collate(encoded: list[dict]) -> Batch:
    """Right-pad encoded examples (`layout.stack_layouts`) and build the strategic-attention
    mask, each probe row reading its window."""
    slots = stack_layouts([e["layout"] for e in encoded])
    B, L = slots.kinds.shape
    window = torch.zeros(B, L, L, dtype=torch.bool)
    lm_rows, lm_t, cls_rows, cls_t, probe, kl = [], [], [], [], [], []
    for b, e in enumerate(encoded):
        kl += [(b, s) for s in e["kl_rows"]]
        for s, (lo, hi) in zip(e["layout"].probe_slots, e["windows"]):
            window[b, s, lo:hi] = True
        lm_rows += [(b, s) for s in e["lm_rows"]]
        lm_t += e["lm_targets"]
        cls_rows += [(b, s) for s in e["cls_rows"]]
        cls_t += e["cls_targets"]
        probe += e["is_probe"]
    ids, kinds, pos, mask = slots.ids, slots.kinds, slots.positions, slots.mask(window)
    return Batch(ids, kinds, pos, mask,
                 torch.tensor(lm_rows, dtype=torch.long).view(-1, 2),
                 torch.tensor(lm_t, dtype=torch.long),
                 torch.tensor(cls_rows, dtype=torch.long).view(-1, 2),
                 torch.tensor(cls_t), torch.tensor(probe, dtype=torch.bool),
                 torch.tensor(kl, dtype=torch.long).view(-1, 2),
                 stack_layouts([e["plain"] for e in encoded]) if kl else None)


def base_log_probs(model: SafetyModel, plain: SlotBatch, rows: torch.Tensor) -> torch.Tensor:
    """``(K, V)`` next-token log-probabilities of the base model (adapter off, no ``[CLS]``) at
    ``rows`` ``(K, 2)`` (batch, slot) of ``plain``; no gradient."""
    with torch.no_grad(), model.lm.disable_adapter():
        hidden, _ = model.hidden_states(plain.ids, plain.kinds, plain.positions, plain.mask())
        return F.log_softmax(model.lm_logits(hidden[rows[:, 0], rows[:, 1]]).float(), dim=-1)


def compute_loss(model: SafetyModel, batch: Batch, lambda_cls: float, kl_to_base: float = 0.0) -> Losses:
    """The recipe's loss on one batch (module docstring); the KL term runs only when
    ``kl_to_base`` is set and the batch has `kl_rows` (one more forward, of the base model)."""
    hidden, _ = model.hidden_states(batch.ids, batch.kinds, batch.positions, batch.mask)
    if len(batch.lm_targets):
        h_lm = hidden[batch.lm_rows[:, 0], batch.lm_rows[:, 1]]
        lm_loss = F.cross_entropy(model.lm_logits(h_lm).float(), batch.lm_targets)
    else:
        lm_loss = hidden.new_zeros(())
    h_cls = hidden[batch.cls_rows[:, 0], batch.cls_rows[:, 1]]
    logits = model.safety_logits(h_cls).float()
    cls_loss = F.binary_cross_entropy_with_logits(logits, batch.cls_targets)
    total = lm_loss + lambda_cls * cls_loss
    kl = hidden.new_zeros(())
    if kl_to_base and len(batch.kl_rows):
        rows = batch.kl_rows
        student = F.log_softmax(model.lm_logits(hidden[rows[:, 0], rows[:, 1]]).float(), dim=-1)
        kl = F.kl_div(student, base_log_probs(model, batch.plain, rows), log_target=True, reduction="batchmean")
        total = total + kl_to_base * kl
    return Losses(total, lm_loss, cls_loss, kl, logits)


@torch.no_grad()
def scores(model, encoded, batch_size, lambda_cls):
    """Head probabilities of encoded examples: ``(query labels, query scores, probe labels,
    probe scores, LM losses of batches with LM targets)``, in input order."""
    model.eval()
    q_lab, q_score, p_lab, p_score, lm = [], [], [], [], []
    for i in range(0, len(encoded), batch_size):
        b = collate(encoded[i:i + batch_size])
        out = compute_loss(model, b, lambda_cls)
        lm_loss, probs = out.lm, torch.sigmoid(out.cls_logits).tolist()
        for pr, t, isp in zip(probs, b.cls_targets.tolist(), b.cls_is_probe.tolist()):
            (p_lab if isp else q_lab).append(int(t))
            (p_score if isp else q_score).append(pr)
        if len(b.lm_targets):
            lm.append(float(lm_loss))
    model.train()
    return q_lab, q_score, p_lab, p_score, lm


@torch.no_grad()
def evaluate(model, encoded, batch_size, lambda_cls):
    """Validation metrics of the query verdict, the response-window probes and the LM loss."""
    return summarize(*scores(model, encoded, batch_size, lambda_cls))


def summarize(q_lab, q_score, p_lab, p_score, lm) -> dict:
    """The metrics of `evaluate` from the output of `scores`."""
    return {"query": classification_metrics(q_lab, q_score),
            "response_window": classification_metrics(p_lab, p_score),
            "lm_loss": round(sum(lm) / max(len(lm), 1), 4)}


def balanced_batches(encoded: list[dict], labels: list[int], batch_size: int) -> list[list[int]]:
    """Length-grouped batches that each hold the two classes in the proportion of the whole set.

    The authors use llama-recipes' length-based sampler with 72 sequences a batch. With
    8 a batch, length groups are nearly one class each (sources differ in length), and the
    BCE gradient swings with the class of each batch. Our choice: each class, sorted by length,
    is spread over the batches rank by rank, so padding stays low and every batch has the
    global class mix (4 + 4 for equal classes; about 5 + 3 at 60 % benign) instead of a tail
    of one-class batches (docs/method.md, "Decision 12").

    Returns:
        ``ceil(len(labels) / batch_size)`` lists of indices into ``encoded``; sizes differ by
        at most 2 from ``batch_size``.
    """
    n_batches = max(1, math.ceil(len(labels) / batch_size))
    batches: list[list[int]] = [[] for _ in range(n_batches)]
    for c in (0, 1):
        members = sorted((i for i, y in enumerate(labels) if y == c), key=lambda i: len(encoded[i]["slots"]))
        for rank, i in enumerate(members):
            batches[rank * n_batches // len(members)].append(i)
    return [b for b in batches if b]


def train(cfg: TrainConfig, base_dir: Path, log=print, resume: bool = False) -> dict:
    """Run the recipe and write the checkpoint to ``cfg.output_dir``. Returns the summary.

    ``resume``: go on from the partial checkpoint's training state (`save_partial`) at the step
    it was saved, with the same batches in the same order, so a run stopped by its time cap, by
    Ctrl-C or by the end of a session ends as it would have run in one go (our choice: a 2-core
    machine may need several sessions for one run). While it trains, SIGINT and SIGTERM stop it
    after the step under way (`stop_requests`). Raises `ResumeError` when there is no state to go
    on from, or the config or the data differ from the saved run's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safety_decoding.base_model import BASE_MODEL_NAME, EXPECTED_WEIGHTS_SHA256, recorded_weights_sha256

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    base_sha = recorded_weights_sha256(base_dir, lm.state_dict())
    saved = read_train_state(cfg) if resume else None
    examples, manifest = training_examples(cfg)
    sets = split(examples, cfg)  # held-out sets leave before the self answers are drawn
    val_ex, train_ex = sets.validation, sets.train
    answered_queries: dict = (saved or {}).get("self_answers") or {"queries": [], "answers": []}

    def answer(queries: list[str]) -> list[str]:
        # a resumed run takes the answers it trained on: greedy decoding on another CPU can
        # break a near tie, and they take minutes to generate
        if queries != answered_queries["queries"]:
            answered_queries.update(queries=queries, answers=self_answers(
                lm, tok, queries, cfg.max_response_tokens, autocast=cfg.bf16_autocast))
        return answered_queries["answers"]

    if cfg.self_answers_per_class:
        t0 = time.monotonic()
        answered, manifest["self_answers"] = with_self_answers(
            val_ex + train_ex, answer,
            cfg.self_answers_per_class, rng, cfg.self_answer_sources, cfg.self_answer_lm_loss)
        val_ex, train_ex = answered[:len(val_ex)], answered[len(val_ex):]
        log(f"self answers: {manifest['self_answers']} in {(time.monotonic() - t0) / 60:.1f} min")
    manifest.update(n_train=len(train_ex), n_validation=len(val_ex))
    held_out = {k: v for k, v in sets.sizes().items() if k not in ("train", "validation") and v}
    if held_out:
        manifest["held_out"] = held_out
    log(f"data: {json.dumps(manifest)}")
    enc_train = [encode_example(tok, e, cfg, rng) for e in train_ex]
    enc_val = [encode_example(tok, e, cfg, rng) for e in val_ex]

    if cfg.init_checkpoint:
        lm = PeftModel.from_pretrained(lm, str(Path(cfg.init_checkpoint) / ADAPTER_DIR), is_trainable=True)
        manifest["init_checkpoint"] = cfg.init_checkpoint
    else:
        lm = get_peft_model(lm, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM"))
    # The prepared SmolLM2 keeps its hub name; your own model is named by its folder.
    base_name = BASE_MODEL_NAME if base_sha == EXPECTED_WEIGHTS_SHA256 else Path(base_dir).name
    scfg = SafetyConfig(base_model=base_name, base_model_sha256=base_sha,
                        hidden_size=lm.config.hidden_size, cls_token_id=lm.config.vocab_size,
                        lambda_cls=cfg.lambda_cls, data_manifest=manifest,
                        lora_rows=cfg.lora_rows,
                        refusal_completion=REFUSAL_COMPLETION if cfg.refusal_reasons == ReasonStyle.NONE
                        or cfg.lora_rows == LoraRows.SAFETY else "")
    model = SafetyModel(lm, scfg)
    if cfg.init_checkpoint:
        load_safety_weights(model, cfg.init_checkpoint)
    model.train()
    lora_params = [p for n, p in model.lm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([
        {"params": lora_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [model.cls_embedding, *model.head.parameters()], "lr": cfg.head_lr,
         "weight_decay": 0.0},
    ])
    batches = balanced_batches(enc_train, [e.query_label for e in train_ex], cfg.batch_size)
    total_steps = len(batches) * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    order_rng = rng if cfg.data_order_seed is None else random.Random(cfg.data_order_seed)
    fingerprint = data_fingerprint(enc_train, batches)
    done, earlier_seconds = 0, 0.0
    if saved:
        done, earlier_seconds = restore_train_state(saved, fingerprint, model, opt, sched)
        log(f"resuming at step {done} of {total_steps} ({earlier_seconds / 60:.1f} min trained before)")
    last_step = min(total_steps, cfg.max_steps or total_steps)

    def state(step: int, seconds: float) -> dict:
        return train_state(cfg, fingerprint, model, opt, sched, step, earlier_seconds + seconds,
                           answered_queries)

    start = time.monotonic()
    step, stopped_early = 0, False
    clock = StepClock(start, total_steps, done)
    bar = tqdm(total=total_steps, initial=done, desc="train", mininterval=5)
    with stop_requests() as stop:
        for epoch in range(cfg.epochs):
            order_rng.shuffle(batches)
            for idx in batches:
                if step < done:  # replay the batch order up to the saved step
                    step += 1
                    continue
                if step >= last_step or stop.is_set() or (time.monotonic() - start) / 60 > cfg.max_minutes:
                    stopped_early = True
                    break
                b = collate([enc_train[i] for i in idx])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                    losses = compute_loss(model, b, cfg.lambda_cls, cfg.kl_to_base)
                opt.zero_grad(set_to_none=True)
                losses.total.backward()
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                shown = {name: float(getattr(losses, name).detach()) for name in ("lm", "cls", "kl")}
                bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
                if cfg.log_every_steps and step % cfg.log_every_steps == 0:
                    log(clock.line(step, time.monotonic(), **shown))
                if cfg.save_every_steps and step % cfg.save_every_steps == 0:
                    save_partial(model, scfg, cfg.output_dir, {"steps": step, "total_steps": total_steps},
                                 state(step, time.monotonic() - start))
            if stopped_early:
                break
    interrupted = stop.is_set()
    if interrupted:
        log(f"interrupted at step {step}: validating and saving what was trained")
    bar.close()
    seconds = time.monotonic() - start
    trained = step - done
    log(f"trained {step} of {total_steps} steps, {trained} in {seconds / 60:.1f} min "
        f"({seconds / max(trained, 1):.2f} s/step)")
    finished = step >= last_step
    # a later `--resume` goes on from here, also when a finished run is killed while validating
    save_partial(model, scfg, cfg.output_dir, {"steps": step, "total_steps": total_steps},
                 state(step, seconds))
    val_scores = scores(model, enc_val, cfg.batch_size, cfg.lambda_cls)
    metrics = summarize(*val_scores)
    summary = {"steps": step, "total_steps": total_steps, "stopped_early": stopped_early,
               "train_minutes": round((earlier_seconds + seconds) / 60, 1),
               "seconds_per_step": round(seconds / max(trained, 1), 3), "validation": metrics}
    if done:
        summary["resumed_at_step"] = done
    if interrupted:
        summary["interrupted"] = True
    log(f"validation: {json.dumps(metrics)}")
    if held_out or len(set(cfg.formats)) > 1:
        summary["held_out"] = held_out_report(model, tok, cfg, sets, val_ex, val_scores)
        log(f"held out: {json.dumps(summary['held_out'])}")
    if cfg.threshold_from_calibration and "held_out" in summary and sets.calibration:
        scfg = replace(scfg, threshold=summary["held_out"]["threshold"])
        log(f"threshold {scfg.threshold} (calibration FPR target {cfg.calibration_fpr})")
    out = Path(cfg.output_dir)
    model.save_checkpoint(out, SafetyConfig(**{**asdict(scfg), "metrics": summary}))
    (out / "train_summary.json").write_text(json.dumps({"manifest": manifest, **summary}, indent=2) + "\n")
    if finished:  # the final checkpoint supersedes the partial one
        shutil.rmtree(partial_dir(cfg.output_dir), ignore_errors=True)
    return summary


@contextlib.contextmanager
def stop_requests():
    """Within the block, SIGINT (Ctrl-C) and SIGTERM (``kill``, the end of a session) set the
    yielded `threading.Event` instead of raising, and the training loop stops before its next
    step: the saved state then never holds a step's update without its step count (our choice;
    an exception raised between ``opt.step()`` and ``step += 1`` would resume one batch ahead).
    A second signal raises KeyboardInterrupt, stopping at once with the last partial checkpoint.
    Outside the main thread, where handlers cannot be set, the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    before = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class StepClock:
    """Per-step timing for the training log: seconds a step since the last line, minutes
    elapsed, and minutes left at that pace."""

    def __init__(self, start: float, total_steps: int, first_step: int = 0):
        self.start, self.total = start, total_steps
        self.last_t, self.last_step = start, first_step

    def line(self, step: int, now: float, **losses: float) -> str:
        per_step = (now - self.last_t) / max(step - self.last_step, 1)
        self.last_t, self.last_step = now, step
        left = per_step * (self.total - step) / 60
        parts = " ".join(f"{k}={v:.3f}" for k, v in losses.items())
        return (f"step {step}/{self.total}: {per_step:.2f} s/step, {(now - self.start) / 60:.1f} min "
                f"elapsed, about {left:.0f} min left, {parts}")


def partial_dir(output_dir: str | Path) -> Path:
    """Where `save_partial` writes: ``<output_dir>.partial``, beside the final checkpoint."""
    out = Path(output_dir)
    return out.with_name(out.name + ".partial")


def save_partial(model: SafetyModel, scfg: SafetyConfig, output_dir: str | Path, progress: dict,
                 state: dict | None = None) -> Path:
    """Write the model trained so far as a loadable checkpoint (`partial_dir`), its config's
    ``metrics`` saying how far it got, and ``state`` (`train_state`) as `TRAIN_STATE` for
    ``train(resume=True)``. Written to a temporary folder first and then renamed, so a run killed
    while saving still leaves the previous partial checkpoint (as ``.old`` for the instant
    between the two renames)."""
    final = partial_dir(output_dir)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_checkpoint(tmp, SafetyConfig(**{**asdict(scfg), "metrics": {**progress, "partial": True}}))
    if state is not None:
        torch.save(state, tmp / TRAIN_STATE)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


TRAIN_STATE = "train_state.pt"
# Keys a resumed run may change: how long this invocation runs and how it reports.
RESUMABLE_CHANGES = ("max_minutes", "max_steps", "threads", "save_every_steps", "log_every_steps")


class ResumeError(ValueError):
    """``train(resume=True)`` cannot go on: no saved state, or another config or data."""


def data_fingerprint(enc_train: list[dict], batches: list[list[int]]) -> str:
    """SHA-256 of the encoded training examples (slots, targets, windows) and the batches they
    form, before the first shuffle: a resumed run rebuilds its data and must get the same."""
    h = hashlib.sha256()
    for e in enc_train:
        h.update(json.dumps([list(e["slots"]), e["lm_targets"], e["cls_targets"], e["kl_rows"],
                             e["windows"]]).encode())
    h.update(json.dumps(batches).encode())
    return h.hexdigest()


def _run_config(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def train_state(cfg: TrainConfig, fingerprint: str, model: SafetyModel, opt, sched, step: int,
                seconds: float, self_answers: dict) -> dict:
    """What `restore_train_state` needs to go on at ``step``: the trained parameters (LoRA,
    [CLS] row, head), the optimizer's and scheduler's state, the RNG states (LoRA dropout draws
    from torch's), the training seconds so far and the base model's answers
    (``{"queries", "answers"}``) that the data were built with."""
    return {"step": step, "seconds": seconds, "config": _run_config(cfg), "fingerprint": fingerprint,
            "self_answers": self_answers,
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def read_train_state(cfg: TrainConfig) -> dict:
    """`TRAIN_STATE` of ``cfg.output_dir``'s partial checkpoint (`train_state`). Raises
    `ResumeError`: none there, or saved by a run of another config."""
    path = partial_dir(cfg.output_dir) / TRAIN_STATE
    if not path.exists():
        raise ResumeError(f"no training state to resume from at {path}: start the run without --resume")
    saved = torch.load(path, weights_only=True)
    changed = sorted(k for k, v in _run_config(cfg).items() if saved["config"].get(k) != v)
    if changed:
        raise ResumeError(f"the config differs from the saved run's in {changed}; only "
                          f"{list(RESUMABLE_CHANGES)} may change on resume")
    return saved


def restore_train_state(saved: dict, fingerprint: str, model: SafetyModel, opt, sched) -> tuple[int, float]:
    """Load a `read_train_state` state into the model, optimizer, scheduler and RNGs. Returns
    (steps done, training seconds so far). Raises `ResumeError`: the data differ."""
    if saved["fingerprint"] != fingerprint:
        raise ResumeError("the training data differ from the saved run's (data files or code changed)")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(saved["params"]) != trainable:
        raise ResumeError("the saved parameters are not this model's trainable ones")
    model.load_state_dict(saved["params"], strict=False)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    return saved["step"], saved["seconds"]


@torch.no_grad()
def query_scores(model: SafetyModel, tok, cfg: TrainConfig, examples: list[Example]) -> tuple[list, list]:
    """``(labels, scores)`` of the query verdict of ``examples``, in input order.

    ``[CLS]`` reads the query alone (`layout.sequence_layout`), so each example is scored as
    its query only (no response, prefill or probes) in batches of similar length: the same
    verdict for less work (our choice: on 2 AVX2 cores the held-out report took 20 minutes for
    the 1,372 calibration examples with their answers, and takes 6.5 for its 2,105 queries)."""
    bare = [replace(e, response="", response_prefix="", response_label=None, lm_loss=False) for e in examples]
    enc = [encode_example(tok, e, cfg, random.Random(0)) for e in bare]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]["slots"]))
    _, by_length, *_ = scores(model, [enc[i] for i in order], cfg.batch_size, cfg.lambda_cls)
    by_index = dict(zip(order, by_length))
    return [e.query_label for e in examples], [by_index[i] for i in range(len(enc))]


def held_out_report(model: SafetyModel, tok, cfg: TrainConfig, sets: Splits, val_ex: list[Example],
                    val_scores, with_scores: bool = False) -> dict:
    """Query-verdict AUROC and rates of validation (by format too), source- and
    category-held-out sets at the threshold the calibration set gives for ``calibration_fpr``
    (`metrics.held_out_metrics`); with ``with_scores`` also ``"scores": {set: {"labels",
    "scores"}}`` of every set, so another checkpoint can be compared at equal rates
    (`metrics.tpr_at_fpr`)."""

    def by(examples, lab_score, key, prefix):
        """``{prefix + key(e): (labels, scores)}`` of the subsets of ``examples``."""
        out = {}
        for k in dict.fromkeys(key(e) for e in examples):
            rows = [i for i, e in enumerate(examples) if key(e) == k]
            out[prefix + k] = ([lab_score[0][i] for i in rows], [lab_score[1][i] for i in rows])
        return out

    calibration = query_scores(model, tok, cfg, sets.calibration)
    source = query_scores(model, tok, cfg, sets.source_held_out)
    named = {"validation": val_scores[:2],  # one query row per example, in order
             "source_held_out": source,
             "category_held_out": query_scores(model, tok, cfg, sets.category_held_out),
             **by(val_ex, val_scores, lambda e: Format(e.format).value, "validation_"),
             **by(sets.source_held_out, source, lambda e: e.source, "source_held_out:")}
    if any(e.source == SHAREGPT_CALIBRATION for e in sets.calibration):
        named |= by(sets.calibration, calibration,
                    lambda e: "sharegpt" if e.source == SHAREGPT_CALIBRATION else "contrast", "calibration:")
    report = held_out_metrics(calibration, named, cfg.calibration_fpr)
    if with_scores:
        report["scores"] = {name: {"labels": list(ls), "scores": [round(float(x), 6) for x in ss]}
                            for name, (ls, ss) in {"calibration": calibration, **named}.items()}
    return report


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a YAML file of `TrainConfig` keys; unknown keys raise ``ValueError``."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    fields = TrainConfig.__dataclass_fields__
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"unknown training config keys: {sorted(unknown)}")
    for k, v in raw.items():  # YAML lists become the tuples the dataclass declares
        if isinstance(v, list) and isinstance(fields[k].default, tuple):
            raw[k] = tuple(v)
    return TrainConfig(**raw)
