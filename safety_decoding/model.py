"""The explicit-safety-signal model: a causal LM plus an input-only ``[CLS]`` and a binary head.

``[CLS]`` is not added to the vocabulary. Its embedding is a separate learned row that replaces
the token embedding wherever a slot has kind ``CLS`` or ``PROBE`` (see `masks`), so the tied LM
head keeps its original size and ``[CLS]`` can never be sampled (docs/method.md, "Decision 5";
the authors also leave the LM head unresized). The head is ``Linear(hidden, 1)`` on the final
hidden state after the last norm; ``p_malicious = sigmoid(logit)`` (docs/method.md, "The [CLS]
token and the head").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .masks import CLS, PROBE
from .types import LoraRows, Quantization

CHECKPOINT_CONFIG = "ess_config.json"
SAFETY_WEIGHTS = "safety_head.safetensors"
ADAPTER_DIR = "adapter"
REFUSAL_PREFIX = "Sorry, I cannot fulfill your request because"
REFUSAL_COMPLETION = " it could help cause serious harm to people."
"""The server's own end of the refusal, for checkpoints trained with no refusal text
(`SafetyConfig.refusal_completion`)."""


def tokens_read_cls(config) -> bool:
    """Whether the response's token rows read ``[CLS]`` under a checkpoint's `SafetyConfig`
    (the paper's implicit channel): not when its adapter runs on the safety rows only, where the
    language model must stay exactly the base model (docs/method.md, "Decision 17")."""
    return LoraRows(getattr(config, "lora_rows", LoraRows.ALL)) == LoraRows.ALL


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the base model."""


@dataclass(frozen=True)
class SafetyConfig:
    """Everything a checkpoint records besides weights (``ess_config.json``)."""

    base_model: str
    """Name of the base model the adapter was trained on."""
    base_model_sha256: str
    """`base_model.weights_sha256` of the base weights; checked on load."""
    hidden_size: int
    cls_token_id: int
    """Virtual id of ``[CLS]`` (the base vocabulary size): never produced by the tokenizer."""
    lambda_cls: float = 0.1
    """Weight of the BCE loss on ``[CLS]`` logits (paper: 0.1 or 0.01)."""
    threshold: float = 0.5
    """Malicious when ``p > threshold`` (docs/method.md, "The [CLS] token and the head")."""
    tau: int = 3
    r1: int = 10
    r2: int = 10
    r3: int = 10
    refusal_prefix: str = REFUSAL_PREFIX
    refusal_completion: str = ""
    """Text inserted after `refusal_prefix`, after which the response ends; empty: the LM writes
    the explanation after the prefix (the paper's design). Our choice for checkpoints whose LM
    trained on no refusal text (`refusal_reasons: none`; docs/method.md, "Decision 10")."""
    lora_rows: str = LoraRows.ALL.value
    """`types.LoraRows`: the rows the LoRA adapter runs on; ``safety`` keeps the adapter
    unmerged and the language model exactly the base model (docs/method.md, "Decision 17")."""
    data_manifest: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class SafetyModel(nn.Module):
    """Wraps a Hugging Face Llama-style causal LM (optionally a peft model).

    Shapes: ``B`` batch, ``q`` rows computed in this forward, ``kv`` key slots, ``H`` hidden.
    """

    def __init__(self, lm: nn.Module, config: SafetyConfig):
        super().__init__()
        self.lm = lm
        self.config = config
        H = config.hidden_size
        emb = self._causal_lm().get_input_embeddings().weight
        # Our choice: start [CLS] at the mean token embedding (paper: not published).
        self.cls_embedding = nn.Parameter(emb.detach().mean(0).clone())
        self.head = nn.Linear(H, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.adapter_on_safety_rows = not tokens_read_cls(config)  # `LoraRows.SAFETY`
        self._safety_rows = None  # (B, q, 1) rows the adapter runs on, set per forward
        if self.adapter_on_safety_rows:
            self._mask_lora_to_safety_rows()
        self.fused = None
        """A `fused.FusedBody` that replaces the body and LM head in `hidden_states` and
        `lm_logits` while autograd is off (set by `use_fused_forward`; it copies the weights,
        so call it again after changing them), or None."""

    def use_fused_forward(self, on: bool = True, quantization: str = "none") -> bool:
        """Run the body and LM head through `fused.FusedBody` (built now from the current
        weights, with ``quantization``, a `types.Quantization` value) or, with ``on`` False,
        through transformers' modules again.

        Returns:
            Whether the fused forward is on: False where the body cannot be fused (LoRA not
            merged, unless the checkpoint runs it on the safety rows only; a layer that is not
            Llama-shaped), and the model stays as it was.

        Raises:
            ValueError: ``quantization`` does not fit the model (`fused.check_quantization`).
        """
        from .fused import FusedBody, can_fuse

        rows = self.adapter_on_safety_rows
        self.fused = FusedBody(self.decoder, self._causal_lm().lm_head, quantization, row_adapters=rows) \
            if on and can_fuse(self.decoder, row_adapters=rows) else None
        return self.fused is not None

    def use_compiled_step(self, on: bool = True) -> bool:
        """Run one-row decode steps through `compiled.CompiledStep` (built now from the current
        weights; it compiles on its first call) or, with ``on`` False, all through the fused
        forward again.

        Returns:
            Whether it is on: False where it cannot run (the fused forward off, on CUDA, int8
            weights, a LoRA adapter on the safety rows only), and the model stays as it was.
        """
        from .compiled import CompiledStep

        fused = self.fused
        can = fused is not None and fused.quantization == Quantization.NONE and not fused.row_adapters and \
            next(self.parameters()).device.type == "cpu"
        if fused is not None:
            fused.compiled = CompiledStep(self.decoder) if on and can else None
        return bool(on and can)

    def _mask_lora_to_safety_rows(self) -> None:
        """Zero every LoRA branch's output on token rows (`LoraRows.SAFETY`): a forward hook on
        each peft ``lora_B`` multiplies its output ``(B, q, out)`` by the forward's row mask, so
        token rows compute the base model's function and only ``[CLS]``/probe rows the adapted
        one. Our choice: hooks keep peft's modules, adapter files and training loop as they are."""
        def hook(_module, _args, out):
            rows = self._safety_rows
            return out if rows is None else out * rows.to(out.dtype)

        for name, module in self.lm.named_modules():
            if name.rsplit(".", 2)[-2:-1] == ["lora_B"]:
                module.register_forward_hook(hook)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the fused body: it is derived from the weights, and
        oneDNN's packed weights are opaque tensors that cannot be copied (call
        `use_fused_forward` on the copy)."""
        return super().__getstate__() | {"fused": None}

    def _causal_lm(self) -> nn.Module:
        lm = self.lm
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def decoder(self) -> nn.Module:
        """The transformer body (``LlamaModel``), ending in the final norm."""
        return self._causal_lm().model

    def embed(self, ids: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """``ids, kinds: (B, q)`` -> ``(B, q, H)``; CLS/PROBE slots get the [CLS] embedding."""
        emb = self._causal_lm().get_input_embeddings()
        vocab = emb.weight.shape[0]
        x = emb(ids.clamp(0, vocab - 1))
        is_cls = ((kinds == CLS) | (kinds == PROBE)).unsqueeze(-1)
        return torch.where(is_cls, self.cls_embedding.to(x.dtype), x)

    def hidden_states(self, ids, kinds, position_ids, attention_mask, past_key_values=None):
        """One forward of the body.

        Args:
            ids, kinds, position_ids: ``(B, q)``.
            attention_mask: ``(B, 1, q, kv)`` bool from `masks.strategic_attention_mask`.
            past_key_values: a transformers ``Cache`` or None.

        Returns:
            ``(hidden (B, q, H) after the final norm, cache)``.
        """
        safety_rows = ((kinds == CLS) | (kinds == PROBE)) if self.adapter_on_safety_rows else None
        if self.fused is not None and not torch.is_grad_enabled():  # never under autograd
            rows = None if safety_rows is None else safety_rows.flatten().nonzero().flatten()
            return self.fused(self.embed(ids, kinds), attention_mask, position_ids, past_key_values, rows), \
                past_key_values
        self._safety_rows = None if safety_rows is None else safety_rows.unsqueeze(-1)
        out = self.decoder(
            inputs_embeds=self.embed(ids, kinds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=past_key_values is not None,
        )
        return out.last_hidden_state, past_key_values

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` -> ``(..., V)`` next-token logits."""
        if self.fused is not None and not torch.is_grad_enabled():
            return self.fused.lm_logits(hidden)
        return self._causal_lm().lm_head(hidden)

    def safety_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` -> ``(...)`` malicious logits; ``sigmoid`` gives p_malicious."""
        return self.head(hidden).squeeze(-1)

    # ---- checkpoint I/O -------------------------------------------------------------

    def save_checkpoint(self, out_dir: str | Path, config: SafetyConfig | None = None) -> None:
        """Write ``ess_config.json``, the [CLS] row + head (safetensors), and the LoRA adapter."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = config or self.config
        (out / CHECKPOINT_CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        save_file({
            "cls_embedding": self.cls_embedding.detach().contiguous(),
            "head.weight": self.head.weight.detach().contiguous(),
            "head.bias": self.head.bias.detach().contiguous(),
        }, str(out / SAFETY_WEIGHTS))
        if hasattr(self.lm, "peft_config"):  # only the LoRA adapter, never the base weights
            self.lm.save_pretrained(str(out / ADAPTER_DIR))
            compact_adapter(out / ADAPTER_DIR)


def compact_adapter(adapter_dir: str | Path) -> None:
    """Store the LoRA weights as float16 (half the size; peft casts them back on load).

    Our choice, so that the shipped checkpoint stays well under 20 MB; LoRA factors are small
    values for which float16 loses nothing measurable.
    """
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def read_safety_config(ckpt_dir: str | Path) -> SafetyConfig:
    """Read ``ess_config.json``.

    Raises:
        CheckpointError: the file is missing or not valid JSON for `SafetyConfig`.
    """
    path = Path(ckpt_dir) / CHECKPOINT_CONFIG
    try:
        return SafetyConfig(**json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} not found: is {ckpt_dir} an ESS checkpoint?") from exc
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc


def load_plain_model(base_dir: str | Path, dtype: torch.dtype = torch.float32) -> SafetyModel:
    """The prepared base model alone (no LoRA, an untrained zero head) as a `SafetyModel`, so
    the decoder can run it as the no-defence baseline.

    Only meaningful with ``SafetyParams(enabled=False)``: the ``[CLS]`` row is the mean token
    embedding and the zero head gives ``p_malicious = 0.5``, which never exceeds the threshold.

    Raises:
        OSError: ``base_dir`` holds no loadable model.
    """
    from transformers import AutoModelForCausalLM

    base_dir = Path(base_dir)
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    recorded = base_dir / "WEIGHTS_SHA256"
    cfg = SafetyConfig(base_model=base_dir.name,
                       base_model_sha256=recorded.read_text().strip() if recorded.exists() else "unknown",
                       hidden_size=lm.config.hidden_size, cls_token_id=lm.config.vocab_size)
    return SafetyModel(lm, cfg).to(dtype).eval()


def load_safety_model(ckpt_dir: str | Path, base_dir: str | Path, merge: bool = True,
                      dtype: torch.dtype = torch.float32) -> SafetyModel:
    """Load the base model from ``base_dir`` and apply the checkpoint in ``ckpt_dir``.

    Args:
        merge: fold the LoRA weights into the base weights (faster decoding; our choice for
            serving). Never done for a `LoraRows.SAFETY` checkpoint, whose adapter runs on
            some rows only.

    Raises:
        CheckpointError: a missing or corrupt file, or a base model whose weights hash or
            hidden size differs from the one the checkpoint was trained on.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt_dir, base_dir = Path(ckpt_dir), Path(base_dir)
    cfg = read_safety_config(ckpt_dir)
    recorded = base_dir / "WEIGHTS_SHA256"
    base_sha = recorded.read_text().strip() if recorded.exists() else "unknown"
    if base_sha != cfg.base_model_sha256:
        raise CheckpointError(
            f"base model mismatch: checkpoint {ckpt_dir} was trained on {cfg.base_model} with "
            f"weights sha256 {cfg.base_model_sha256}, but {base_dir} has {base_sha}; run "
            "`ess prepare --force` or point --base-model at the right folder")
    lm = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    if lm.config.hidden_size != cfg.hidden_size:
        raise CheckpointError(f"hidden size mismatch: checkpoint {cfg.hidden_size}, base "
                              f"{lm.config.hidden_size}")
    adapter = ckpt_dir / ADAPTER_DIR
    if adapter.exists():
        try:
            lm = PeftModel.from_pretrained(lm, str(adapter))
        except Exception as exc:  # peft raises several types for bad adapters
            raise CheckpointError(f"LoRA adapter in {adapter} is corrupt or does not fit "
                                  f"{cfg.base_model}: {exc}") from exc
        if merge and tokens_read_cls(cfg):  # an adapter on every row
            lm = lm.merge_and_unload()
    model = SafetyModel(lm, cfg)
    load_safety_weights(model, ckpt_dir)
    return model.to(dtype).eval()


def load_safety_weights(model: SafetyModel, ckpt_dir: str | Path) -> None:
    """Copy a checkpoint's [CLS] row (hidden_size,) and head (1, hidden_size) + (1,) into ``model``.

    Raises:
        CheckpointError: the file is missing or corrupt, or its [CLS] row has another size.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / SAFETY_WEIGHTS
    try:
        weights = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is missing or corrupt: {exc}") from exc
    hidden = model.config.hidden_size
    if weights.get("cls_embedding") is None or weights["cls_embedding"].shape != (hidden,):
        raise CheckpointError(f"{SAFETY_WEIGHTS}: cls_embedding does not have shape ({hidden},)")
    with torch.no_grad():
        model.cls_embedding.copy_(weights["cls_embedding"])
        model.head.weight.copy_(weights["head.weight"])
        model.head.bias.copy_(weights["head.bias"])
