"""Configuration of the hybrid Vision Transformer: a small CNN backbone that turns the
image into a grid of tokens, followed by a plain pre-norm transformer encoder.

This file and `modeling_hybrid_vit.py` are what `save_pretrained` copies into a Hub
model folder, so they import only torch and transformers.
"""

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

CIFAR10_LABELS = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class HybridViTConfig(PretrainedConfig):
    r"""
    Architecture of a [`HybridViTModel`]. The defaults are the project's design (1.0 M
    parameters): an airbench-shaped backbone (a frozen 2x2 patch-whitening convolution, then
    three stages of two 3x3 convolutions, 48, 96 and 192 channels, each pooling after its first
    convolution) whose last two stages make 64 tokens, a feature pyramid on the 8x8 grid of
    the second stage; and one 192-wide class-attention block (CaiT) that reads them from the
    CLS token.

    Args:
        image_size (`int`, *optional*, defaults to 32):
            Height and width of the input images, in pixels.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels.
        backbone_hidden_sizes (`list[int]`, *optional*, defaults to `[48, 96, 192]`):
            Output channels of each backbone stage. A stage is `backbone_layers_per_stage`
            blocks of conv 3x3 + BatchNorm + activation, followed by a 2x2 max-pool, so the
            backbone downsamples by `2 ** len(backbone_hidden_sizes)`.
        backbone_layers_per_stage (`int`, *optional*, defaults to 2):
            Conv + BatchNorm + activation blocks in each backbone stage.
        backbone_pool_first (`bool`, *optional*, defaults to `True`):
            Put each stage's max-pool right after its first convolution (before that
            convolution's BatchNorm and activation) instead of at the end of the stage, so
            the stage's other convolutions run at the reduced resolution. With two layers
            per stage this is airbench's block: the same depth for about half the FLOPs.
        backbone_whitening_size (`int`, *optional*, defaults to 2):
            If positive, the backbone starts with a frozen `k x k` convolution (`k` this
            value, "same" padding) followed by the activation, whose `2 * num_channels * k * k`
            filters whiten image patches: the eigenvectors of the patch covariance scaled by
            the inverse square root of their eigenvalue, and their negatives. Its weights are
            set from training images by [`HybridViTPreTrainedModel.fit_whitening`] (which
            `run_train.py` calls before training) and saved with the model. 0: no whitening layer.
        token_stages (`int`, *optional*, defaults to 2):
            How many of the backbone's last stages make the tokens. 1: the last stage's
            grid, one token per `patch_size` square. 2 or more: a feature pyramid (Lin et
            al. 2017) on the grid of the earliest of them, so twice (or more) as fine: each
            token is its own stage's features through a 1x1 convolution, plus the token of
            the coarser grid above it (nearest-neighbour upsampled). A token is then a
            region half the size that still carries what the deepest stage saw.
        patch_size (`int`, *optional*):
            The side of the image patch that one token stands for: the backbone's
            downsampling at the first token stage, `2 ** (len(backbone_hidden_sizes) -
            token_stages + 1)` (each stage pools by 2), derived when not given. A given
            value must equal it, and it must divide `image_size`.
        hidden_size (`int`, *optional*, defaults to 192):
            Width of the transformer encoder.
        num_hidden_layers (`int`, *optional*, defaults to 1):
            Number of transformer blocks. 0 leaves the backbone alone (with `pooling="mean"`):
            global average pooling of its tokens, a layer norm and the linear head, the
            baseline that shows what the transformer adds.
        class_attention_layers (`int`, *optional*, defaults to 1):
            How many of the `num_hidden_layers` blocks, the last ones, are class-attention
            blocks (CaiT, Touvron et al. 2021): only the CLS token queries, and only it is
            updated, so their projections and MLP run on one token instead of all of them.
            Needs `pooling="cls"`.
        num_attention_heads (`int`, *optional*, defaults to 3):
            Attention heads per block; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 384):
            Hidden width of each block's MLP.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP and of the backbone (any key of `transformers.activations.ACT2FN`).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on embeddings, on attention and MLP outputs, and before the classifier.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth rate of the last block; it rises linearly from 0 in the first.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the layer norms.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query, key and value projections have a bias.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialisation of linear layers,
            position embeddings and the CLS token.
        pooling (`str`, *optional*, defaults to `"cls"`):
            What the classifier reads: `"cls"`, the CLS token (ViT), or `"mean"`, the mean of
            the patch tokens (global average pooling).
        logit_temperature (`float`, *optional*, defaults to 1.0):
            The classifier's logits are divided by this (temperature scaling, Guo et al.
            2017), so that softmax probabilities match how often the model is right. Set by
            `run_eval.py --save_temperature` on the validation split; it never changes which
            class is predicted. Training starts from 1.

    Labels default to the ten CIFAR-10 classes; pass `id2label` / `label2id` (or
    `num_labels`) for another dataset.
    """

    model_type = "hybrid_vit"

    def __init__(
        self,
        image_size=32,
        num_channels=3,
        backbone_hidden_sizes=(48, 96, 192),
        backbone_layers_per_stage=2,
        backbone_pool_first=True,
        backbone_whitening_size=2,
        token_stages=2,
        patch_size=None,
        hidden_size=192,
        num_hidden_layers=1,
        class_attention_layers=1,
        num_attention_heads=3,
        intermediate_size=384,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        initializer_range=0.02,
        pooling="cls",
        logit_temperature=1.0,
        **kwargs,
    ):
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(enumerate(CIFAR10_LABELS))
            kwargs["label2id"] = {name: i for i, name in enumerate(CIFAR10_LABELS)}
        self.image_size = image_size
        self.num_channels = num_channels
        self.backbone_hidden_sizes = list(backbone_hidden_sizes)
        self.backbone_layers_per_stage = backbone_layers_per_stage
        self.backbone_pool_first = backbone_pool_first
        self.backbone_whitening_size = backbone_whitening_size
        self.token_stages = token_stages
        stages = len(self.backbone_hidden_sizes) - token_stages + 1 if isinstance(token_stages, int) else 0
        self.patch_size = 2**stages if patch_size is None else patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.class_attention_layers = class_attention_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.initializer_range = initializer_range
        self.pooling = pooling
        self.logit_temperature = logit_temperature
        super().__init__(**kwargs)
        self._validate_architecture()

    def _validate_architecture(self):
        """Every field in range; a bad value raises a ValueError naming it."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")

        for name in (
            "image_size",
            "num_channels",
            "backbone_layers_per_stage",
            "patch_size",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
        ):
            positive_int(name)
        if not self.backbone_hidden_sizes or any(
            isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in self.backbone_hidden_sizes
        ):
            raise ValueError(
                f"`backbone_hidden_sizes` must be a non-empty list of positive integers, got {self.backbone_hidden_sizes!r}"
            )
        if not isinstance(self.backbone_pool_first, bool):
            raise ValueError(f"`backbone_pool_first` must be true or false, got {self.backbone_pool_first!r}")
        size = self.backbone_whitening_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"`backbone_whitening_size` must be 0 (off) or a positive kernel size, got {size!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of transformers' activations (e.g. 'gelu'), got {self.hidden_act!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"`initializer_range` must be positive, got {self.initializer_range!r}")
        if isinstance(self.logit_temperature, bool) or not (isinstance(self.logit_temperature, (int, float)) and self.logit_temperature > 0):
            raise ValueError(f"`logit_temperature` must be a positive number, got {self.logit_temperature!r}")
        self._validate_shape()

    def _validate_shape(self):
        """The blocks, the pooling and the token grid fit together."""
        layers = self.num_hidden_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 0:
            raise ValueError(f"`num_hidden_layers` must be 0 (the backbone alone) or a positive integer, got {layers!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"`pooling` must be 'cls' or 'mean', got {self.pooling!r}")
        if layers == 0 and self.pooling != "mean":
            raise ValueError("`num_hidden_layers` 0 needs `pooling` 'mean': with no blocks the CLS token sees no image")
        ca = self.class_attention_layers
        if isinstance(ca, bool) or not isinstance(ca, int) or not 0 <= ca <= layers:
            raise ValueError(
                f"`class_attention_layers` must be an integer from 0 to `num_hidden_layers` ({layers}), got {ca!r}"
            )
        if ca and self.pooling != "cls":
            raise ValueError("`class_attention_layers` needs `pooling` 'cls': class attention updates only the CLS token")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by `patch_size` ({self.patch_size})"
            )
        stages, token_stages = len(self.backbone_hidden_sizes), self.token_stages
        if isinstance(token_stages, bool) or not isinstance(token_stages, int) or not 1 <= token_stages <= stages:
            raise ValueError(
                f"`token_stages` must be an integer from 1 to the number of backbone stages ({stages}), got {token_stages!r}"
            )
        downsampling = 2 ** (stages - token_stages + 1)
        if downsampling != self.patch_size:
            raise ValueError(
                f"`backbone_hidden_sizes` has {stages} stages and the tokens come from the last {token_stages}, "
                f"which downsample by {downsampling}, but `patch_size` is {self.patch_size}"
            )
        if self.image_size % self.backbone_downsampling:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by the backbone's downsampling "
                f"({self.backbone_downsampling})"
            )

    @property
    def backbone_downsampling(self):
        """How much the whole backbone downsamples: 2 ** len(backbone_hidden_sizes)."""
        return 2 ** len(self.backbone_hidden_sizes)

    @property
    def num_patches(self):
        """Tokens the backbone produces, CLS excluded: (image_size / patch_size) ** 2."""
        return (self.image_size // self.patch_size) ** 2


__all__ = ["HybridViTConfig", "CIFAR10_LABELS"]
