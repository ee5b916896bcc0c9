"""MobileVLM V2 as a transformers 5 model whose state_dict names are the published checkpoints' own.

transformers has no class for MobileVLM (mtgv/MobileVLM_V2-1.7B, -3B, -7B): the original code
(github.com/Meituan-AutoML/MobileVLM, mobilevlm/model/) subclasses LlamaForCausalLM and keeps the
vision parts inside the Llama `model`, so a checkpoint holds

    model.embed_tokens.* model.layers.N.* model.norm.* lm_head.*        MobileLLaMA, a plain Llama
    model.vision_tower.vision_tower.vision_model.*                       CLIP ViT-L/14-336 (transformers 4 names)
    model.mm_projector.mlp.mlp.{0,2}.*  model.mm_projector.peg.peg.0.*   the LDPv2 projector

and a config.json with the Llama keys at the top level plus `mm_*` keys. The classes here are built so
that `state_dict()` gives exactly those names (no renaming on load or save): the tower is assembled from
transformers' CLIP layers under the same attribute path, the projector under MobileVLM's own.

Two keys are ours (the published config.json lacks them; families/mobilevlm.py refuses it, saying what
to add): `vision_config`, the tower's CLIPVisionConfig (the original reads it from the hub by the name in
`mm_vision_tower`, which cannot be done offline), and `image_token_index`, a real `<image>` token id
whose positions the image features replace. The original instead splices the features in at a -200
placeholder that no tokenizer or embedding row knows.

The connector reads hidden state `mm_vision_select_layer` of the tower (-2: the second-to-last block,
before any post-layernorm), drops the CLS position, and LDPv2 maps the N x N patch features to
(N/2) x (N/2) tokens: a 2-layer GELU MLP, 2x2 average pooling over the grid, then a depthwise 3x3
convolution added back as a residual (the "PEG"). The original pools with AdaptiveAvgPool2d((12, 12)),
which is exactly 2x2 pooling for the 24 x 24 grid of a 336 px / patch 14 tower; pooling 2x2 here lets
shrunk test towers keep the same structure (an even grid side is required, see the family).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, GenerationMixin, LlamaConfig
from transformers import initialization as init
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPVisionEmbeddings
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

MODEL_TYPE = "mobilevlm"


class MobileVLMConfig(LlamaConfig):
    """MobileLLaMA's Llama keys at the top level, the `mm_*` keys of the published config.json, and the
    tower's config as `vision_config` (None when config.json has none: the family refuses that)."""

    model_type = MODEL_TYPE
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {"vision_config": SubConfigSpec(CLIPVisionConfig, optional=True)}

    vision_config: dict | PreTrainedConfig | None = None
    image_token_index: int | None = None
    mm_vision_tower: str | None = None
    mm_projector_type: str = "ldpnetv2"
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str | None = "pad"
    mm_use_im_start_end: bool = False
    vision_tower_type: str = "clip"

    @property
    def feature_layer(self) -> int:
        """`mm_vision_select_layer` as a non-negative index into the tower's hidden states (0: embeddings)."""
        return self.mm_vision_select_layer % (self.vision_config.num_hidden_layers + 1)

    @property
    def patch_grid(self) -> int:
        """Patches per side of the tower's input image."""
        return self.vision_config.image_size // self.vision_config.patch_size


class CLIPVisionTransformer(nn.Module):
    """A CLIP vision transformer under transformers 4's attribute names (`embeddings`, `pre_layrnorm`,
    `encoder.layers`, `post_layernorm`), which MobileVLM's checkpoints keep, built from transformers'
    CLIP layers. It returns one hidden state, running only the blocks that state needs."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        # In the checkpoint and counted, but the connector reads a hidden state from before it.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """hidden_states[layer] as transformers counts them: 0 is the pre-layernormed embeddings."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype)))
        for block in self.encoder.layers[:layer]:
            hidden = block(hidden, None)
        return hidden


class MobileVLMVisionTower(nn.Module):
    """MobileVLM's tower wrapper (CLIPVisionTower) holding a CLIPVisionModel (`vision_model`): only the
    names matter, so the published keys `vision_tower.vision_tower.vision_model.*` are this module's."""

    def __init__(self, config: MobileVLMConfig):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = CLIPVisionTransformer(config.vision_config)
        self.feature_layer = config.feature_layer
        self.drop_cls = config.mm_vision_select_feature == "patch"
        self._config = config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, patches, vision hidden]: the selected hidden state without its CLS position."""
        # The CLIP layers are plain modules, not a sub-model transformers tells which attention kernel to use
        # (it sets the top config's only): they run whatever the model runs, also after set_attn_implementation.
        self._config.vision_config._attn_implementation_internal = self._config._attn_implementation
        hidden = self.vision_tower.vision_model(pixel_values, self.feature_layer)
        return hidden[:, 1:] if self.drop_cls else hidden


class FeatureMLP(nn.Module):
    """LDPv2's first stage (`mlp.mlp`): Linear(vision hidden, text hidden), GELU, Linear(text hidden, text hidden)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)


class PositionConv(nn.Module):
    """LDPv2's position encoding (`peg.peg`): a depthwise 3x3 convolution over the token grid, added back."""

    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid + self.peg(grid)


class LDPv2Projector(nn.Module):
    """[images, side*side, vision hidden] -> [images, (side/2)^2, text hidden]: MLP, 2x2 average pooling of
    the token grid (row-major, as CLIP orders patches), depthwise-conv residual."""

    def __init__(self, in_dim: int, out_dim: int, side: int):
        super().__init__()
        self.side = side  # static: traced graphs (ONNX, Core ML, TFLite) keep a fixed grid
        self.mlp = FeatureMLP(in_dim, out_dim)
        self.peg = PositionConv(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(features)
        batch, _, dim = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, dim, self.side, self.side)
        grid = self.peg(F.avg_pool2d(grid, kernel_size=2, stride=2))
        return grid.flatten(2).transpose(1, 2)


class MobileVLMPreTrainedModel(LlamaPreTrainedModel):
    config: MobileVLMConfig
    config_class = MobileVLMConfig
    input_modalities = ("image", "text")
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CLIPVisionEmbeddings):  # a raw parameter and a buffer the generic init skips
            init.normal_(module.class_embedding, mean=0.0, std=module.embed_dim ** -0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))


class MobileVLMModel(MobileVLMPreTrainedModel, LlamaModel):
    """MobileLLaMA (LlamaModel: `embed_tokens`, `layers`, `norm`, `rotary_emb`; its forward is the text
    decoder's) holding the tower (`vision_tower`) and the projector (`mm_projector`), as the original does."""

    def __init__(self, config: MobileVLMConfig):
        super().__init__(config)
        self.vision_tower = MobileVLMVisionTower(config)
        self.mm_projector = LDPv2Projector(config.vision_config.hidden_size, config.hidden_size, config.patch_grid)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, image tokens, text hidden]: what replaces each image's `<image>` tokens."""
        return self.mm_projector(self.vision_tower(pixel_values))


class MobileVLMForCausalLM(MobileVLMPreTrainedModel, GenerationMixin):
    """The whole model: `generate` greedy-decodes with the image merged on the first step (GenerationMixin
    forwards `pixel_values` only with the prompt, when there is a KV cache)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MobileVLMConfig):
        super().__init__(config)
        self.model = MobileVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values)

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             pixel_values: torch.Tensor) -> torch.Tensor:
        """`inputs_embeds` with each `<image>` position replaced by the next image feature, image by image."""
        features = self.get_image_features(pixel_values)
        slots = input_ids == self.config.image_token_index
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens but {features.shape[0]} image(s) of "
                             f"{features.shape[1]} features were given")
        mask = slots.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids: its <image> tokens say where the features go")
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, pixel_values)
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def pooled_tokens(patch_grid: int) -> int:
    """Image tokens LDPv2 makes from a patch_grid x patch_grid tower output."""
    return (patch_grid // 2) ** 2


def _register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know `mobilevlm` (idempotent: importing twice is harmless)."""
    AutoConfig.register(MODEL_TYPE, MobileVLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(MobileVLMConfig, MobileVLMForCausalLM, exist_ok=True)


_register()
