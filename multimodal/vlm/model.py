"""A LLaVA-style vision-language model from transformers' own classes: a SigLIP vision tower, LLaVA's two-layer
projector and a Llama language model (the bundled SmolLM2-135M-Instruct's real weights, or a tiny one from config).

LLaVA: Liu et al. 2023, "Visual Instruction Tuning", arXiv 2304.08485 (image features projected into the LM's
embedding space replace placeholder tokens in the prompt). SigLIP: Zhai et al. 2023, arXiv 2303.15343 (here only
its ViT architecture, trained from scratch: no vision weights are available offline).

Images enter as text does: the prompt carries one ``<image>`` placeholder (a special token added to the SmolLM2
tokenizer), which :func:`expand_image_tokens` widens to ``num_image_tokens`` copies (one per patch feature), and
the pixel values travel beside the token ids (``RolloutBatch.inputs["pixel_values"]``, (B, 3, H, W) float in
[-1, 1]). :func:`check_image_tokens` verifies before every forward that each row holds exactly as many placeholder
tokens as its image has features.

Sources (``load() -> (model, tokenizer)``, like ``common.models``'s, named by import path in YAML):
    TinyVLM        a few-layer LM and vision tower from config, for tests (seconds).
    SmolVLM        SmolLM2-135M-Instruct's real weights + a vision tower and projector initialised from a seed.
    PretrainedVLM  SmolVLM after the SFT of ``python -m multimodal.vlm.pretrain``, read from the on-disk cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from common.models import LoRA, PolicySource, bundled_smollm2_path, cache_dir, load_tokenizer

IMAGE_TOKEN = "<image>"
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # pixel_values = (uint8 / 255 - 0.5) / 0.5, in [-1, 1] (SigLIP's normalisation)


@dataclass
class VisionTower:
    """The SigLIP vision tower's size (``transformers.SiglipVisionConfig``) and the projector's activation.

    Args:
        image_size: square input side in pixels (images are rendered at this size; nothing is resized).
        patch_size: side of a patch; the image gives (image_size / patch_size)^2 features = placeholder tokens.
        hidden_size, intermediate_size, num_layers, num_heads: the ViT's width, MLP width, depth and heads
            (hidden_size / num_heads >= 32 keeps the head size vLLM's CPU attention supports).
    """

    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 3
    num_heads: int = 4

    def __post_init__(self):
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"VisionTower: image_size ({self.image_size}) must be a positive multiple of patch_size "
                             f"({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionTower: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def vlm_tokenizer(path: str | Path | None = None):
    """The SmolLM2 tokenizer (or the one at ``path``) with the ``<image>`` special token added (left padding)."""
    tok = load_tokenizer(path if path is not None else bundled_smollm2_path())
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tok.image_token = IMAGE_TOKEN
    return tok


def llava_config(text_config, vision: VisionTower, image_token_id: int):
    """transformers' ``LlavaConfig`` around ``text_config`` (a LlamaConfig) and a SigLIP tower of ``vision``'s size."""
    from transformers import LlavaConfig, SiglipVisionConfig

    v = SiglipVisionConfig(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                           num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size, num_channels=3,
                           vision_use_head=False)
    return LlavaConfig(vision_config=v, text_config=text_config, image_token_id=image_token_id,
                       vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu",
                       tie_word_embeddings=text_config.tie_word_embeddings, image_seq_length=vision.num_image_tokens)


def num_image_tokens(model) -> int:
    """Placeholder tokens (= features) per image of a Llava ``model`` (its config's (image / patch)^2)."""
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def expand_image_tokens(texts: list[str], n: int) -> list[str]:
    """Each text with its single ``<image>`` widened to ``n`` copies (as LlavaProcessor does); a text without exactly
    one ``<image>`` is refused, naming it."""
    out = []
    for i, t in enumerate(texts):
        if t.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"prompt {i}: expected exactly one {IMAGE_TOKEN!r} placeholder in the prompt text, found "
                             f"{t.count(IMAGE_TOKEN)} in {t[:120]!r}")
        out.append(t.replace(IMAGE_TOKEN, IMAGE_TOKEN * n))
    return out


def check_image_tokens(input_ids: Tensor, pixel_values: Tensor | None, image_token_id: int, per_image: int) -> None:
    """Every row of ``input_ids`` (B, L) must hold exactly ``per_image`` placeholder tokens for its one image
    (``pixel_values`` (B, 3, H, W)); raises one line naming the first row at fault. One host sync per call."""
    if pixel_values is None:
        raise ValueError("pixel_values: the VLM needs an image per row (RolloutBatch.inputs['pixel_values'], "
                         "(B, 3, H, W)), got none")
    if pixel_values.dim() != 4 or pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(f"pixel_values must be (B={input_ids.shape[0]}, 3, H, W), got {tuple(pixel_values.shape)}")
    counts = (input_ids == image_token_id).sum(1)  # (B,)
    bad = counts != per_image
    if bool(bad.any()):  # ok: one sync per forward, the guard the issue asks for
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"image placeholder tokens != image features: row {row} has {int(counts[row])} "
                         f"{IMAGE_TOKEN} tokens but its image gives {per_image} features")


def pixels_from_uint8(images: Tensor) -> Tensor:
    """uint8 images (B, 3, H, W) in [0, 255] -> pixel_values (B, 3, H, W) float32 in [-1, 1] (SigLIP's mean/std)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def image_processor(vision: VisionTower):
    """transformers' PIL image processor with this VLM's normalisation (no resize: images are rendered at size)."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=[PIXEL_MEAN] * 3, image_std=[PIXEL_STD] * 3,
                                  do_convert_rgb=True, do_pad=False)


def processor(tokenizer, vision: VisionTower):
    """A ``LlavaProcessor`` (text with ``<image>`` -> expanded ids + pixel_values) for this VLM, for use outside
    the policy (inference scripts, export); the policy does the same with :func:`expand_image_tokens` and
    :func:`pixels_from_uint8` on tensors."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor(vision), tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy="full", image_token=IMAGE_TOKEN, num_additional_image_tokens=0,
                          chat_template=tokenizer.chat_template)


def _build(text_config, vision: VisionTower, tokenizer, seed: int):
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(text_config, vision, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


class TinyVLM(PolicySource):
    """A randomly initialised tiny VLM from config (for tests and smoke runs): a Llama of ``num_layers`` layers and
    a SigLIP tower of ``vision``'s size, SmolLM2's real tokenizer plus ``<image>``. Seeded: two loads are identical.

    Args:
        hidden_size, num_layers, num_heads: the language model's width, depth and heads.
        vision: the vision tower (default: 16x16 images, 8x8 patches -> 4 image tokens, width 32, 1 layer).
        seed: initialisation seed.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, vision: VisionTower | None = None,
                 seed: int = 0):
        self.hidden_size, self.num_layers, self.num_heads, self.seed = hidden_size, num_layers, num_heads, seed
        self.vision = vision if vision is not None else VisionTower(image_size=16, patch_size=8, hidden_size=32,
                                                                    intermediate_size=64, num_layers=1, num_heads=1)

    def load(self):
        from transformers import LlamaConfig

        tok = vlm_tokenizer()
        text = LlamaConfig(vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
                           num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_heads, max_position_embeddings=1024, tie_word_embeddings=True,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return _build(text, self.vision, tok, self.seed), tok


class SmolVLM(PolicySource):
    """SmolLM2-135M-Instruct's real weights as the language model (loaded offline through ``common.models``), the
    ``<image>`` embedding added (initialised to the mean embedding, transformers' resize rule), and a SigLIP vision
    tower and projector initialised from ``seed`` (no vision weights exist offline; :mod:`multimodal.vlm.pretrain`
    trains them).

    Args:
        vision: the vision tower (default 32x32 images, 8x8 patches -> 16 image tokens, width 128, 3 layers).
        seed: initialisation seed of the vision tower and projector.
    """

    def __init__(self, vision: VisionTower | None = None, seed: int = 0):
        self.vision = vision if vision is not None else VisionTower()
        self.seed = seed

    def load(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        path = bundled_smollm2_path()
        tok = vlm_tokenizer(path)
        text = AutoConfig.from_pretrained(path)
        model = _build(text, self.vision, tok, self.seed)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True), None
        del lm, missing, unexpected
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model.resize_token_embeddings(len(tok), mean_resizing=True)
        model.config.text_config.vocab_size = len(tok)
        return model, tok


def config_key(config: dict) -> str:
    """A short stable hash of a JSON-able config (the pre-training cache key)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class PretrainConfig:
    """Everything that determines a pre-trained VLM (its cache key): the tower, the data and the two stages'
    schedules. Stage 1 (caption alignment, no LM in the loop): the tower and projector learn to emit the LM's input
    embeddings of the image's caption. Stage 2 (SFT through the LM): LoRA on the LM's top layers learns to answer
    the question from those features in one word; the tower is frozen (and the projector too when lr_vision = 0,
    so the backward pass stops at the lowest adapted layer)."""

    vision: VisionTower = field(default_factory=VisionTower)
    language: str = "smollm2"  # "smollm2" (SmolVLM) or "tiny" (TinyVLM, tests)
    seed: int = 0
    tower_steps: int = 1500  # stage 1: caption alignment of the tower + projector (cheap: no LM)
    tower_batch_size: int = 32
    tower_lr: float = 2e-3
    steps: int = 30  # stage 2: answer NLL through the LM
    batch_size: int = 8
    lr_vision: float = 0.0  # of the projector in stage 2 (0 = frozen)
    lr_language: float = 1e-3  # of the LoRA adapters (lora_rank > 0) or of the LM weights (lora_rank = 0)
    lora_rank: int = 16  # LoRA on the LM during SFT, merged into the saved weights (0 = full fine-tuning)
    lora_top_layers: int = 8  # LoRA on the last this-many decoder layers only (0 = all)
    lora_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train_size: int = 20000
    tasks: tuple[str, ...] = ("colour", "shape", "count", "position", "bars")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["lora_modules"] = list(self.lora_modules)
        return d

    @property
    def directory(self) -> Path:
        return cache_dir() / "vlm" / f"smolvlm-{config_key(self.as_dict())}"


class PretrainedVLM(PolicySource):
    """The SFT'd SmolVLM from the on-disk cache (``$ADVLAB_CACHE/vlm/smolvlm-<key>``, key = hash of the
    :class:`PretrainConfig`). Missing: one line naming the command that builds it (nothing is trained implicitly).

    Args:
        path: a directory written by ``python -m multimodal.vlm.pretrain`` (None = the default config's).
    """

    def __init__(self, path: str | None = None):
        self.path = Path(path).expanduser() if path is not None else PretrainConfig().directory
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"PretrainedVLM: path {str(self.path)!r} holds no pre-trained VLM; build it with "
                                    "`python -m multimodal.vlm.pretrain` (about 20 minutes on a loaded 2-core CPU)")

    def load(self):
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(self.path, dtype=torch.float32)
        return model, vlm_tokenizer(self.path)


@dataclass
class LanguageLoRA(LoRA):
    """LoRA adapters on the language model's attention only (the vision tower's q/k/v projections are left alone):
    peft's ``target_modules`` as a regex over module names under ``model.language_model``.

    Args (beyond :class:`common.models.LoRA`'s):
        top_layers: adapt only the last ``top_layers`` decoder layers (0 = all). With the image features and the
            layers below frozen, the backward pass stops at the lowest adapted layer (the pre-training's cheap SFT).
    """

    top_layers: int = 0

    def apply(self, model):
        from peft import LoraConfig, get_peft_model

        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank}")
        if self.top_layers < 0:
            raise ValueError(f"LoRA top_layers must be >= 0 (0 = every layer), got {self.top_layers}")
        names = "|".join(self.target_modules)
        layers = r"\d+"
        if self.top_layers:
            n = int(model.config.text_config.num_hidden_layers)  # model: the LlavaForConditionalGeneration
            layers = "|".join(str(i) for i in range(max(0, n - self.top_layers), n))
        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                         target_modules=rf".*language_model\.layers\.({layers})\..*\.({names})")
        return get_peft_model(model, cfg)

    @classmethod
    def of(cls, lora: LoRA) -> "LanguageLoRA":
        return lora if isinstance(lora, cls) else cls(**asdict(lora))
