"""A BERT-family encoder's layers in one C call (nm_cpu.c ``encoder_layers``).

With int8 N:M layers on the integer kernels, a 128-token MiniLM forward spent about as long in the
Python around its layers (transformers' module calls, views, LayerNorm and residual ops) as in the
N:M kernels themselves. :func:`use_encoder_layers` gives the encoder module a forward that hands
the hidden states to C for all layers at once, where the model is one it can run: the BERT
family's post-norm blocks (``adapters.BertFamily``: BERT, MiniLM) whose six projections are int8
:class:`SparseLinear` layers on the select or pair kernel, the intermediate GELU fused into its
layer, absolute positions. Any
call it cannot take as a whole (gradients, torch.compile tracing, cross-attention, a mask that is
not a per-key padding mask, hooks on a layer, extra arguments) goes to the model's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ..adapters import BertFamily, find_family
from .attention import key_bias, padding_only
from .loader import library, ptr
from .nm_linear import ACTIVATIONS, SparseLinear

NE = 14   # int64 fields of a linear in encoder_layers' table (nm_cpu.c E_KIND .. E_ACT)


def _linear_row(lin: nn.Module) -> list[int] | None:
    """One projection's table row, or None when it is not an int8 SparseLinear on an integer kernel."""
    if not isinstance(lin, SparseLinear):
        return None
    n, m = lin.weight_nm.nm
    bias = ptr(lin.bias).value if lin.bias is not None else 0
    act = ACTIVATIONS[lin.activation]
    if lin.select_weights is not None:
        p = (lin.select_indices, lin.select_weights, lin.select_starts, lin.select_sums)
        lanes, width = lin.select_geometry
        return [0, *(t.data_ptr() for t in p), lin.select_scales.data_ptr(), bias, lin.out_features, lin.in_features,
                n, m, width, lanes, act]
    if lin.pair_weights is not None:
        p = (lin.pair_weights, lin.pair_offsets, lin.pair_columns, lin.pair_starts)
        return [1, *(t.data_ptr() for t in p), lin.layout_scales.data_ptr(), bias, lin.out_features, lin.in_features,
                n, m, lin.weight_nm.pair_block, lin.pair_qmax, act]
    return None


class EncoderLayers:
    """The table ``encoder_layers`` reads for one encoder (built once; it points into the modules'
    buffers, which it keeps alive), and the forward that calls it."""

    def __init__(self, model: nn.Module, family: BertFamily) -> None:
        config = model.config
        self.base = family.base(model)
        self.encoder = encoder = self.base.encoder
        self.original = type(encoder).forward.__get__(encoder)
        self.base_original = type(self.base).forward.__get__(self.base)
        rows = []
        for block in family.encoder_blocks(model):
            lins = [_linear_row(x) for x in (block.q, block.k, block.v, block.o, block.ffn_in, block.ffn_out)]
            if None in lins or lins[4][-1] != ACTIVATIONS["gelu"]:
                raise ValueError("not every projection is an int8 SparseLinear with the GELU fused")
            norms = (block.ln_attn, block.ln_ffn)
            rows.append([t.data_ptr() for n in norms for t in (n.weight, n.bias)] + [v for r in lins for v in r])
        self.table = torch.tensor(rows, dtype=torch.int64)
        # the attention's precision: what the model's attention function uses (use_encoder_attention)
        self.attention_bits = getattr(family.attention_modules(model)[0], "sparsetx_attention_bits", 32)
        self.heads, self.inter = config.num_attention_heads, config.intermediate_size
        self.eps = float(config.layer_norm_eps)
        self.layers = list(family.block_list(model)[1])
        self.watched = [m for layer in self.layers for m in layer.modules()]   # modules whose hooks must see their call

    def takes(self, hidden, mask, args, kwargs) -> bool:
        """Whether this call can run as a whole in C (else the model's own forward runs it)."""
        if (args or torch.compiler.is_compiling() or (torch.is_grad_enabled() and hidden.requires_grad)
                or hidden.dtype != torch.float32 or hidden.dim() != 3 or hidden.shape[1] == 0
                or any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "head_mask"))
                or any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "use_cache"))):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.watched):
            return False   # something records or changes what a layer does
        return padding_only(mask)

    def run(self, hidden: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layers on a copy of ``hidden`` (B, T, D); bias: (B, T) fp32 key bias or None."""
        b, t, d = hidden.shape
        h = hidden.contiguous().clone()
        library().encoder_layers(ptr(self.table), len(self.layers), b, t, d, self.heads, self.inter, self.eps, ptr(h),
                                 ptr(bias), self.attention_bits, torch.get_num_threads())
        return h

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if not self.takes(hidden_states, attention_mask, args, kwargs):
            return self.original(hidden_states, attention_mask, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self.run(hidden_states, key_bias(attention_mask)))

    def c_pooler(self) -> bool:
        """Whether the pooler is BERT's tanh one over a dense layer with a bias (C computes it)."""
        pool = self.base.pooler
        return (pool is not None and isinstance(getattr(pool, "activation", None), nn.Tanh)
                and isinstance(getattr(pool, "dense", None), nn.Linear) and pool.dense.bias is not None)

    def tables(self) -> list[torch.Tensor]:
        """What encoder_forward reads besides the layers: the word, token type and position tables,
        the embedding LayerNorm's weight and bias, and the pooler's weight and bias where C runs it."""
        emb, pool = self.base.embeddings, self.base.pooler
        return [emb.word_embeddings.weight, emb.token_type_embeddings.weight, emb.position_embeddings.weight,
                emb.LayerNorm.weight, emb.LayerNorm.bias] + ([pool.dense.weight, pool.dense.bias] if self.c_pooler() else [])

    def c_embeddings(self) -> bool:
        """Whether the embeddings (and the pooler, where C runs it) can run in C: fp32 tables of the
        usual BertEmbeddings, nothing hooked, inference."""
        emb, pool = self.base.embeddings, self.base.pooler
        mods = [emb, *emb.children()] + ([pool, *pool.children()] if pool is not None else [])
        return not (emb.training or any(m._forward_hooks or m._forward_pre_hooks for m in mods)
                    or any(x.dtype != torch.float32 or not x.is_contiguous() for x in self.tables()))

    def base_forward(self, input_ids=None, attention_mask=None, token_type_ids=None, *args, **kwargs):
        """The base model's forward for the plain call (token ids, a (B, T) padding mask, optional
        token types): embeddings, layers and the pooler in one C call, without transformers' mask
        building and output plumbing (about 0.8 ms of a 9 ms 128-token MiniLM forward) and without
        a PyTorch op whose worker threads would spin beside the kernels'. Any other call (embeddings
        given, positions, caches, outputs asked for, hooks on the encoder or embeddings, ids out of
        the tables' range) goes to the model's own forward, which still runs the layers in C where
        it can."""
        emb = self.base.embeddings
        plain = (not args and input_ids is not None and input_ids.dim() == 2 and 0 < input_ids.shape[1]
                 <= emb.position_embeddings.num_embeddings and input_ids.dtype == torch.long
                 and (attention_mask is None or attention_mask.shape == input_ids.shape)
                 and (token_type_ids is None or token_type_ids.shape == input_ids.shape)
                 and all(v is None or (k == "return_dict" and v) for k, v in kwargs.items())
                 and not (self.encoder._forward_hooks or self.encoder._forward_pre_hooks)
                 and self.c_embeddings() and not self.blocked()
                 and int(input_ids.min()) >= 0 and int(input_ids.max()) < emb.word_embeddings.num_embeddings
                 and (token_type_ids is None or (int(token_type_ids.min()) >= 0
                                                 and int(token_type_ids.max()) < emb.token_type_embeddings.num_embeddings)))
        if not plain:
            return self.base_original(input_ids, attention_mask, token_type_ids, *args, **kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        b, t = input_ids.shape
        d = self.base.config.hidden_size
        bias = None
        if attention_mask is not None:   # 1 keep, 0 padding (transformers' 2-D mask)
            bias = torch.zeros(attention_mask.shape, dtype=torch.float32).masked_fill_(attention_mask == 0, -torch.inf)
        ids = input_ids.contiguous()
        types = None if token_type_ids is None else token_type_ids.to(torch.long).contiguous()
        pool, c_pool, tables = self.base.pooler, self.c_pooler(), self.tables()
        ptrs = torch.tensor([x.data_ptr() for x in tables] + [0] * (7 - len(tables)), dtype=torch.int64)
        h = torch.empty(b, t, d)
        pooled = torch.empty(b, d) if c_pool else None
        library().encoder_forward(ptr(self.table), len(self.layers), b, t, d, self.heads, self.inter, self.eps, ptr(ids),
                                  ptr(types), ptr(ptrs), float(emb.LayerNorm.eps), ptr(h), ptr(bias), ptr(pooled),
                                  self.attention_bits, torch.get_num_threads())
        if pool is not None and not c_pool:
            pooled = pool(h)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h, pooler_output=pooled)

    def blocked(self) -> bool:
        """What stops the C layers whatever the input: tracing, gradients, a hooked layer."""
        return (torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            p.requires_grad for p in self.base.embeddings.parameters()))
                or any(m._forward_hooks or m._forward_pre_hooks for m in self.watched))


def use_encoder_layers(model: nn.Module) -> bool:
    """Give a BERT-family encoder of int8 N:M SparseLinear layers (GELU fused, see
    :func:`~sparsetx.kernels.nm_linear.fuse_activations`) a forward that runs all its layers in one
    C call; returns whether it did. The model's own forward stays for every call it cannot take."""
    config = getattr(model, "config", None)
    family = find_family(model)
    if (library() is None or config is None or not isinstance(family, BertFamily)
            or getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False)
            or getattr(config, "hidden_act", None) != "gelu"
            or getattr(config, "position_embedding_type", "absolute") != "absolute"
            or getattr(config, "_attn_implementation", None) != "sparsetx"
            or config.hidden_size % config.num_attention_heads
            or (config.hidden_size // config.num_attention_heads) % 8):   # the attention kernel's head sizes
        return False
    try:
        plan = EncoderLayers(model, family)
    except (AttributeError, ValueError, TypeError):
        return False
    plan.encoder.forward = plan.forward   # an instance attribute shadows the class's forward
    plan.encoder.sparsetx_layers = plan
    if hasattr(plan.base, "embeddings"):
        plan.base.forward = plan.base_forward
    return True
