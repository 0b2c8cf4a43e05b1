"""Configuration of the reference AttnRes model.

Field names and meanings follow flash-linear-attention's ``TransformerConfig``
(``fla/models/transformer/configuration_transformer.py``) so that an FLA
``config.json`` (``model_type: transformer``) loads unchanged.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def default_intermediate_size(hidden_size: int, hidden_ratio: int | None) -> int:
    """FLA's GatedMLP rule: 2/3 * hidden * ratio, rounded up to a multiple of 256."""
    ratio = 4 if hidden_ratio is None else hidden_ratio
    size = int(hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class AttnResConfig(PretrainedConfig):
    """Decoder-only PreNorm transformer with optional Attention Residuals.

    ``attnres_block_size``:
      * ``None`` -- standard PreNorm residual stream;
      * ``1``    -- Full AttnRes (every sub-layer output is a depth source);
      * even S  -- Block AttnRes (S sub-layers, i.e. S/2 transformer layers, per block).
    """

    model_type = "attnres"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        initializer_range: float = 0.02,
        norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        vocab_size: int = 32000,
        attnres_block_size: int | None = None,
        attnres_two_phase: bool = True,
        **kwargs,
    ):
        if attnres_block_size is not None and attnres_block_size != 1:
            if attnres_block_size < 2 or attnres_block_size % 2 != 0:
                raise ValueError(
                    "`attnres_block_size` must be None (standard residual), 1 (Full AttnRes) or an even "
                    f"integer (Block AttnRes, S/2 transformer layers per block); got {attnres_block_size}."
                )
        if num_kv_heads is not None and num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}).")
        if hidden_act not in ("swish", "silu"):
            raise ValueError(f"hidden_act must be 'swish' or 'silu' (SwiGLU); got {hidden_act!r}.")

        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.qkv_bias = qkv_bias
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.norm_eps = norm_eps
        self.use_cache = use_cache
        self.vocab_size = vocab_size
        self.attnres_block_size = attnres_block_size
        # Inference path for Block/Full AttnRes: the two-phase computation
        # (default) or the naive stack-and-softmax reference.
        self.attnres_two_phase = attnres_two_phase
        # FLA fields we accept for compatibility but that change nothing in
        # the reference implementation (kernel fusion flags).
        for key in ("fuse_norm", "fuse_swiglu", "fuse_cross_entropy", "fuse_linear_cross_entropy",
                    "use_l2warp", "elementwise_affine", "qk_norm", "window_size"):
            kwargs.pop(key, None)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # Names transformers' generic code looks for.
    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return default_intermediate_size(self.hidden_size, self.hidden_ratio)

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_hidden_layers

    @property
    def use_attnres(self) -> bool:
        return self.attnres_block_size is not None


class FLATransformerConfig(AttnResConfig):
    """flash-linear-attention's ``transformer`` model type, read by the reference implementation."""

    model_type = "transformer"

    def __init__(self, **kwargs):
        # Needed: transformers 5 replaces the __init__ of a config subclass that defines
        # none with a dataclass-field init that skips AttnResConfig.__init__ entirely.
        super().__init__(**kwargs)
