"""The hybrid Vision Transformer: a convolutional stem turns the image into a grid of
tokens (the hybrid of Dosovitskiy et al. 2021, sec. 3.1), a plain pre-norm transformer
encoder attends over them, and a linear head reads the normalised CLS token.

Like timm's `vision_transformer_hybrid.py`, the CNN is only the patch embedding: the
encoder is the same as in a patch-based ViT. This file and `configuration_hybrid_vit.py`
are copied into every saved model folder and run under `trust_remote_code=True`, so they
import only torch and transformers.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, ViTImageProcessor
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple

try:
    from .configuration_hybrid_vit import HybridViTConfig
except ImportError:  # run from the checkout or a pip install, not as a Hub package
    from configuration_hybrid_vit import HybridViTConfig

# Per-channel statistics of the CIFAR-10 training images, on a 0-1 scale.
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


class HybridViTPatchWhitening(nn.Module):
    """A k x k convolution ("same" padding) whose filters whiten image patches, then the
    activation. The filters are a buffer, not a parameter: no optimizer or loader can make
    them trainable; they come from `fit` (training images) and are saved with the model.
    Until fitted they pass each patch's pixels through unchanged (in +/- pairs). The bias
    is an ordinary trainable parameter."""

    def __init__(self, config: HybridViTConfig):
        super().__init__()
        k, channels = config.backbone_whitening_size, config.num_channels
        self.kernel_size, self.out_channels = k, 2 * channels * k * k
        self.padding = ((k - 1) // 2, k // 2) * 2  # left, right, top, bottom: "same" size for even k too
        self.register_buffer("weight", self.identity_filters(channels, k))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))
        self.act = ACT2FN[config.hidden_act]

    @staticmethod
    def identity_filters(channels: int, k: int) -> torch.Tensor:
        eye = torch.eye(channels * k * k)
        return torch.cat([eye, -eye]).view(2 * channels * k * k, channels, k, k)

    @torch.no_grad()
    def fit(self, pixel_values: torch.Tensor, eps: float = 5e-4):
        """Set the filters from images (N, C, H, W), normalised as the model sees them: each
        projects a patch onto an eigenvector of the patch covariance and divides by the square
        root of its eigenvalue (plus `eps`); the bias centres the output. Filters come in +/-
        pairs so that the activation keeps both signs."""
        patches = F.unfold(pixel_values.double(), kernel_size=self.kernel_size)  # (N, C*k*k, L), conv order
        patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        mean = patches.mean(0)
        centred = patches - mean
        eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))
        filters = eigenvectors.T / (eigenvalues.clamp(min=0) + eps).sqrt()[:, None]  # (C*k*k, C*k*k)
        filters = torch.cat([filters, -filters])
        self.weight.copy_(filters.view_as(self.weight).to(self.weight.dtype))
        self.bias.copy_(-(filters @ mean).to(self.bias.dtype))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.pad(pixel_values, self.padding), self.weight.to(pixel_values.dtype), self.bias.to(pixel_values.dtype))
        return self.act(x)


class HybridViTEmbeddings(nn.Module):
    """Conv stem -> tokens, plus CLS token and learnable position embeddings. With
    `config.token_stages` > 1 the tokens are a feature pyramid: the last stage's projected
    features, upsampled onto each earlier token stage's grid and added to that stage's own."""

    def __init__(self, config: HybridViTConfig):
        super().__init__()
        self.config = config
        in_channels = config.num_channels
        self.whitening = None
        if config.backbone_whitening_size:
            self.whitening = HybridViTPatchWhitening(config)
            in_channels = self.whitening.out_channels
        layers, stage_ends = [], []
        for width in config.backbone_hidden_sizes:
            for layer in range(config.backbone_layers_per_stage):
                layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1, bias=False))
                if config.backbone_pool_first and layer == 0:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(width), ACT2FN[config.hidden_act]]
                in_channels = width
            if not config.backbone_pool_first:
                layers.append(nn.MaxPool2d(2))
            stage_ends.append(len(layers))
        self.backbone = nn.Sequential(*layers)
        self.to_tokens = nn.Conv2d(in_channels, config.hidden_size, kernel_size=1)
        # The earlier token stages, finest first: where each ends in the backbone, and its
        # own projection into the tokens (the pyramid's lateral connections).
        earlier = range(len(stage_ends) - config.token_stages, len(stage_ends) - 1)
        self.lateral_ends = [stage_ends[i] for i in earlier]
        self.lateral_tokens = nn.ModuleList(
            nn.Conv2d(config.backbone_hidden_sizes[i], config.hidden_size, kernel_size=1) for i in earlier
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Bicubic resize of the patch position embeddings to a (height, width) token grid, as in ViT."""
        grid = self.config.image_size // self.config.patch_size
        if (height, width) == (grid, grid):
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        C = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, C).permute(0, 3, 1, 2)  # (1, C, g, g)
        patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, height * width, C)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The token grid before flattening: (B, hidden_size, H / patch_size, W / patch_size)."""
        if self.whitening is not None:
            pixel_values = self.whitening(pixel_values)
        if not self.lateral_ends:
            return self.to_tokens(self.backbone(pixel_values))
        x, laterals, start = pixel_values, [], 0
        for end, lateral in zip(self.lateral_ends, self.lateral_tokens):
            x = self.backbone[start:end](x)
            laterals.append(lateral(x))
            start = end
        tokens = self.to_tokens(self.backbone[start:](x))
        for lateral in reversed(laterals):  # coarse to fine: each grid is twice the one before
            tokens = lateral + F.interpolate(tokens, size=lateral.shape[-2:], mode="nearest")
        return tokens

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        features = self.features(pixel_values)  # (B, C, H/p, W/p)
        B, C, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, N+1, C)
        position = self.interpolate_pos_encoding(h, w) if interpolate_pos_encoding else self.position_embeddings
        return self.dropout(tokens + position)


def eager_attention_forward(module: nn.Module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """softmax(q k^T * scaling) v, written out: the one code path whose probabilities
    `output_attentions` returns. Scores and softmax run in float32 even under autocast, as
    the fused kernels keep them: bf16 rounds a score of 10 by 0.03, which moves its
    probability by 3%. Returns the output as (B, N, nh, hs), transformers' convention for
    attention functions, and the probabilities (B, nh, N, N)."""
    with torch.autocast(query.device.type, enabled=False):
        scores = (query.float() @ key.float().transpose(-2, -1)) * scaling  # (B, nh, N, N)
        if attention_mask is not None:
            scores = scores + attention_mask
        attentions = scores.softmax(dim=-1)
    out = F.dropout(attentions.to(value.dtype), p=dropout, training=module.training) @ value  # (B, nh, N, hs)
    return out.transpose(1, 2).contiguous(), attentions


class HybridViTAttention(nn.Module):
    """Multi-head self-attention, dispatched like transformers' ViT through
    `ALL_ATTENTION_FUNCTIONS` on `config._attn_implementation` (sdpa by default; eager,
    flex or flash where installed), so `model.set_attn_implementation(...)` switches it at
    run time. The attention probabilities always come from `eager_attention_forward`."""

    def __init__(self, config: HybridViTConfig, class_attention: bool = False):
        super().__init__()
        self.config = config
        self.class_attention = class_attention
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_size**-0.5
        self.is_causal = False
        self.to_qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.to_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        if self.class_attention:
            return self.class_attention_forward(x, output_attentions)
        B, N, C = x.shape
        qkv = self.to_qkv(x).view(B, N, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, nh, N, hs)
        attention = eager_attention_forward
        if not output_attentions:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        out, attentions = attention(self, q, k, v, None, scaling=self.scaling, dropout=dropout, is_causal=False)
        out = out.reshape(B, N, C)  # (B, N, nh, hs) -> (B, N, C)
        return self.out_dropout(self.to_out(out)), attentions if output_attentions else None

    def class_attention_forward(self, x: torch.Tensor, output_attentions: bool = False):
        """Class attention (CaiT, Touvron et al. 2021): only the CLS token queries, over all
        the tokens, so the projections after it run on one token; returns its update (B, 1, C).
        The probabilities returned are (B, nh, N, N) like a self-attention block's: the CLS
        row, then an identity row for each patch token, which the block passes on unchanged.
        The output is computed from that tensor, so gradients with respect to it are the
        CLS row's (and zero on the patch rows)."""
        B, N, C = x.shape
        weight, bias = self.to_qkv.weight, self.to_qkv.bias
        q = F.linear(x[:, :1], weight[:C], None if bias is None else bias[:C])
        q = q.view(B, 1, self.num_heads, self.head_size).transpose(1, 2)  # (B, nh, 1, hs)
        kv = F.linear(x, weight[C:], None if bias is None else bias[C:])
        k, v = kv.view(B, N, 2, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, N, hs)
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        if output_attentions:
            _, cls_row = eager_attention_forward(self, q, k, v, None, scaling=self.scaling)  # (B, nh, 1, N)
            patch_rows = torch.eye(N, dtype=cls_row.dtype, device=cls_row.device)[1:].expand(B, self.num_heads, N - 1, N)
            attentions = torch.cat([cls_row, patch_rows], dim=2)  # (B, nh, N, N)
            probabilities = F.dropout(attentions[:, :, :1].to(v.dtype), p=dropout, training=self.training)
            out = (probabilities @ v).transpose(1, 2)  # (B, 1, nh, hs)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            out, attentions = attention(self, q, k, v, None, scaling=self.scaling, dropout=dropout, is_causal=False)
        out = out.reshape(B, 1, C)
        return self.out_dropout(self.to_out(out)), attentions if output_attentions else None


class HybridViTMLP(nn.Module):
    def __init__(self, config: HybridViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample.
    Written here because the modeling file may import only torch and transformers."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class HybridViTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block. A class-attention block (CaiT's) updates only the CLS
    token: its attention and MLP run on that one token, and the patch tokens pass through."""

    def __init__(self, config: HybridViTConfig, drop_path_rate: float, class_attention: bool = False):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = HybridViTAttention(config, class_attention)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = HybridViTMLP(config)

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        attended, attentions = self.attention(self.layernorm_before(x), output_attentions)
        if self.attention.class_attention:  # attended is the CLS token's update alone, (B, 1, C)
            cls = x[:, :1] + drop_path(attended, self.drop_path_rate, self.training)
            cls = cls + drop_path(self.mlp(self.layernorm_after(cls)), self.drop_path_rate, self.training)
            return torch.cat([cls, x[:, 1:]], dim=1), attentions
        x = x + drop_path(attended, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.layernorm_after(x)), self.drop_path_rate, self.training)
        return x, attentions


class HybridViTPreTrainedModel(PreTrainedModel):
    config_class = HybridViTConfig
    base_model_prefix = "hybrid_vit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["HybridViTLayer"]

    def fit_whitening(self, pixel_values: torch.Tensor, eps: float = 5e-4):
        """Fit the backbone's whitening convolution to training images (see
        `HybridViTPatchWhitening.fit`); needs `config.backbone_whitening_size > 0`."""
        base = getattr(self, self.base_model_prefix, self)
        if base.embeddings.whitening is None:
            raise ValueError("this model has no whitening layer (config.backbone_whitening_size is 0)")
        base.embeddings.whitening.fit(pixel_values.to(base.embeddings.to_tokens.weight.device), eps)

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers.initialization, not torch.nn.init: it skips tensors already loaded
        # from a checkpoint, so from_pretrained does not overwrite them.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, HybridViTPatchWhitening):
            init.copy_(module.weight, module.identity_filters(self.config.num_channels, module.kernel_size))
            init.zeros_(module.bias)
        elif isinstance(module, HybridViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.trunc_normal_(module.cls_token, std=std)


class HybridViTModel(HybridViTPreTrainedModel):
    def __init__(self, config: HybridViTConfig):
        super().__init__(config)
        self.embeddings = HybridViTEmbeddings(config)
        # Stochastic depth rising linearly from 0 to drop_path_rate over the blocks. Plain
        # Python, not torch.linspace(...).tolist(): no tensor is read in __init__, so the
        # model can be built on the meta device (FSDP, DeepSpeed ZeRO-3, accelerate's
        # init_empty_weights).
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        first_class_attention = n - config.class_attention_layers
        self.layers = nn.ModuleList(
            HybridViTLayer(config, rate, class_attention=i >= first_class_attention) for i, rate in enumerate(rates)
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The layer that maps the convolutional features into the transformer's tokens (the
        hybrid's patch projection, as ViT's `patch_embeddings`): `enable_input_require_grads`
        hooks it, so adapters on a frozen stem train with gradient checkpointing."""
        return self.embeddings.to_tokens

    def check_pixel_values(self, pixel_values, interpolate_pos_encoding: bool):
        """Raise a ValueError that says what was expected, rather than a shape error deep inside."""
        config = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"Expected pixel_values of shape (batch, {config.num_channels}, H, W), got {got}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"Expected floating-point pixel_values (normalised images), got dtype {pixel_values.dtype}; "
                "use the model's image processor"
            )
        B, C, H, W = pixel_values.shape
        if C != config.num_channels:
            raise ValueError(f"Expected {config.num_channels} channels, got {C} (pixel_values shape {tuple(pixel_values.shape)})")
        if interpolate_pos_encoding:
            if H % config.backbone_downsampling or W % config.backbone_downsampling:
                raise ValueError(f"Image size {H}x{W} must be a multiple of the backbone's downsampling {config.backbone_downsampling}")
        elif (H, W) != (config.image_size, config.image_size):
            raise ValueError(
                f"Expected {config.image_size}x{config.image_size} images, got {H}x{W}; "
                "resize them or pass interpolate_pos_encoding=True"
            )

    @can_return_tuple  # return_dict=False (or config.return_dict False): a tuple, as in transformers
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.embeddings.to_tokens.weight.dtype)

        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # (B, N+1, C)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, layer_attentions = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(layer_attentions)
        x = self.layernorm(x)
        return BaseModelOutputWithPooling(
            last_hidden_state=x,
            pooler_output=x[:, 0] if self.config.pooling == "cls" else x[:, 1:].mean(dim=1),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )


class HybridViTForImageClassification(HybridViTPreTrainedModel):
    def __init__(self, config: HybridViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.hybrid_vit = HybridViTModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.hybrid_vit.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> ImageClassifierOutput:
        outputs = self.hybrid_vit(
            pixel_values,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        # Divided by the fitted temperature (1 until calibrated): argmax unchanged, softmax calibrated.
        logits = self.classifier(self.dropout(outputs.pooler_output)) / self.config.logit_temperature  # (B, num_labels)
        loss = None if labels is None else self.loss(logits, labels)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss `config.problem_type` names, as in transformers: "regression" is the
        mean squared error, "multi_label_classification" binary cross-entropy on each label,
        "single_label_classification" cross-entropy. Unset, one label means regression and
        otherwise cross-entropy, which also takes soft targets (B, num_labels), such as MixUp
        and CutMix make, where transformers would switch to multi-label BCE. The config is
        never changed."""
        problem, labels = self.config.problem_type, labels.to(logits.device)
        if problem == "regression" or (problem is None and self.num_labels == 1):
            if self.num_labels == 1:
                return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
            return F.mse_loss(logits.float(), labels.float())
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return classification_loss(logits, labels)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for integer class labels (B,) or soft targets (B, num_labels), such as
    MixUp and CutMix produce. Unlike transformers' default loss it never sets
    `config.problem_type`: a saved "multi_label_classification" would make the pipeline
    apply a sigmoid instead of a softmax."""
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(f"Soft labels must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    elif labels.shape != logits.shape[:1]:
        raise ValueError(f"Integer labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    return F.cross_entropy(logits.float(), labels.to(logits.device), label_smoothing=label_smoothing)


def make_image_processor(config: HybridViTConfig) -> ViTImageProcessor:
    """The stock processor the model expects: resize to image_size, scale to 0-1,
    normalise with the CIFAR-10 mean and std."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=CIFAR10_MEAN,
        image_std=CIFAR10_STD,
    )


def save_model_and_processor(model: HybridViTForImageClassification, save_directory: str | os.PathLike, **kwargs):
    """Write a complete Hub model folder: config.json with auto_map, model.safetensors,
    preprocessor_config.json, and both .py files, so that AutoModelForImageClassification,
    AutoImageProcessor and pipeline("image-classification") load it with trust_remote_code=True."""
    model.save_pretrained(save_directory, **kwargs)
    make_image_processor(model.config).save_pretrained(save_directory)


HybridViTConfig.register_for_auto_class()
HybridViTModel.register_for_auto_class("AutoModel")
HybridViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "HybridViTPreTrainedModel",
    "HybridViTModel",
    "HybridViTForImageClassification",
    "classification_loss",
    "make_image_processor",
    "save_model_and_processor",
]
