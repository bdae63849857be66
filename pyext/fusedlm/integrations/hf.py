"""Patch Hugging Face transformers models in place to run on fusedlm's kernels, and undo it.

What `patch(model)` does, each step recorded in the report it returns:
  * attention: registers "fusedlm" in transformers' AttentionInterface *and* its
    AttentionMaskInterface (an attention name missing from the latter gets no mask at all, so a
    padded batch would silently attend to its padding), with a mask function that hands the
    2-D padding mask through without reading it; then sets the model's attention
    implementation to it;
  * every torch.nn.LayerNorm becomes fusedlm.nn.LayerNorm, sharing the same Parameters; and a
    module whose forward is BERT's "dense, dropout, add & norm" (BertSelfOutput, BertOutput and
    their copies in RoBERTa, ELECTRA, ...: recognized by that forward's code) runs its dropout
    and residual add inside the norm's kernels;
  * the MLPs whose code is BERT's feed-forward (BertLayer.feed_forward_chunk over BertIntermediate
    and BertOutput, and their copies), DistilBERT's (FFN.ff_chunk), GPT-2's (GPT2MLP), Llama's
    gated one (LlamaMLP, and Mistral's, Qwen2's, Qwen3's, Gemma 2's: the same code) or
    ModernBERT's GeGLU (ModernBertMLP, without its dropout) run as fusedlm.ops.mlp, which keeps
    the activation's input and not its output for the backward (GELU, its tanh form, ReLU,
    SiLU);
  * for the masked-LM and causal-LM classes, `forward` with labels computes the loss with
    fusedlm.lm_loss on the labelled rows (the MLM head's transform included), never
    materializing the logits: the returned output has logits=None. Without labels the
    original forward runs.
`unpatch(model)` restores the modules, the attention implementation and the forward exactly.

Without a patch, `attn_implementation="fusedlm"` gives a model fusedlm's attention only (see
`register`); norms and the fused loss stay transformers' own.
"""
import functools
import inspect
import types
import weakref
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from ..nn.lm_head import labelled_rows
from ..nn._swap import swap_modules
from ..nn.layer_norm import LayerNorm, RMSNorm, replace_norms
from ..ops import attention as fused_attention
from ..ops import attention_varlen
from ..ops import lm_loss
from ..ops import mlp as fused_mlp

ATTN_NAME = "fusedlm"
_STATE = "_fusedlm_patch"


@dataclass
class PatchReport:
    model: str
    patched: List[str] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (what, why)

    def __str__(self):
        lines = [f"fusedlm.patch({self.model}):"]
        lines += [f"  patched: {p}" for p in self.patched]
        lines += [f"  left alone: {w} ({why})" for w, why in self.left_alone]
        return "\n".join(lines)


# The transformers versions fusedlm's integration supports: from the first with
# AttentionMaskInterface up to (not including) the next major version, whose internals (forward
# signatures, output classes, mask functions) this module depends on. Tested: the version CI
# installs (5.24) and the GPU machine's (5.17).
TRANSFORMERS_RANGE = ((4, 56), (6, 0))


def _version_tuple(version: str):
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit()) or "0"  # "0rc1", "dev0"
        parts.append(int(digits))
    return tuple(parts + [0] * (2 - len(parts)))


def check_transformers_version(version: str):
    lo, hi = TRANSFORMERS_RANGE
    if not lo <= _version_tuple(version) < hi:
        raise RuntimeError(f"fusedlm's transformers integration supports transformers >= "
                           f"{lo[0]}.{lo[1]} and < {hi[0]}.{hi[1]}, found {version}: install a "
                           "version in that range, or use fusedlm's ops and models directly")


def _transformers():
    try:
        import transformers
        from transformers import masking_utils
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:
        raise RuntimeError(f"fusedlm.patch needs transformers >= 4.56 (its AttentionInterface and "
                           f"AttentionMaskInterface); import failed: {e}") from e
    check_transformers_version(transformers.__version__)
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        raise RuntimeError(f"fusedlm.patch needs transformers >= 4.56 (AttentionMaskInterface); "
                           f"found {transformers.__version__}")
    return transformers, masking_utils, AttentionInterface


# Attention arguments of transformers' models that change the function and that fusedlm's
# attention does not implement; `patch` leaves the attention of a model whose config sets one
# alone, and a call that passes one anyway is refused (never run without it).
_UNSUPPORTED_ATTENTION = {
    "s_aux": None,                             # attention sinks (gpt-oss)
}


def _unsupported_attention_config(config, model=None):
    """Why fusedlm's attention cannot serve this config (or model), or None."""
    why = []
    for kwarg, attr in _UNSUPPORTED_ATTENTION.items():
        value = getattr(config, attr, None) if attr else None
        if value is not None:
            why.append(f"config.{attr}={value!r}: fusedlm attention has no {kwarg}")
    if model is not None and any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter)
                                 for m in model.modules()):
        why.append("attention sinks (s_aux): fusedlm attention has none")
    return "; ".join(why) or None


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       is_causal=None, **kwargs):
    """transformers' attention-function signature: q, k, v (batch, heads, seq, D); the mask is
    the 2-D padding mask (batch, seq_k) or None. Returns ((batch, seq, heads, D), None)."""
    if kwargs.get("output_attentions"):
        raise ValueError("fusedlm attention does not materialize attention weights "
                         "(output_attentions=True); unpatch the model to get them")
    for kwarg in _UNSUPPORTED_ATTENTION:
        if kwargs.get(kwarg) is not None:
            raise ValueError(f"fusedlm attention has no {kwarg} (got {kwarg}={kwargs[kwarg]!r} "
                             "from the model); use another attn_implementation for this model")
    model_causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    causal = model_causal and query.shape[2] > 1  # one query (decoding) sees every cached key
    # transformers' sliding window W: query i sees keys i - W < j (<= i when causal), i.e.
    # flash-attn's window_size (W - 1, 0); bottom-right alignment covers a cache's offset.
    window = (-1, -1)
    if kwargs.get("sliding_window") is not None:
        w = int(kwargs["sliding_window"]) - 1
        window = (w, 0 if model_causal else w)
    softcap = float(kwargs.get("softcap") or 0.0)  # Gemma 2's attn_logit_softcapping
    packed = _packed_offsets(query, key, attention_mask, kwargs)
    if packed is not None:  # one row of concatenated sequences: none attends across another
        offsets, checked, new_source = packed
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, D)
        out = attention_varlen(q, k, v, *offsets, causal=causal, dropout_p=dropout,
                               softmax_scale=scaling, window_size=window, softcap=softcap,
                               check_offsets=not checked)
        if new_source is not None:  # after the check: only offsets that passed it
            _remember_offsets(new_source, offsets)
        return out[None], None
    out = fused_attention(query, key, value, causal=causal, attention_mask=attention_mask,
                          dropout_p=dropout, softmax_scale=scaling, layout="bhsd",
                          window_size=window, softcap=softcap)
    return out.transpose(1, 2), None


def _packed_offsets(query, key, attention_mask, kwargs):
    """((cu_seqlens_q, cu_seqlens_k, max_q, max_k), checked, new_source) when the batch is one
    row of packed sequences (Hugging Face's padding-free training, e.g.
    DataCollatorWithFlattening), else None. The offsets are the collator's cu_seq_lens_q/k and
    max_length_q/k when given, else made from position_ids restarting (at their minimum:
    RoBERTa's start past the padding index), as transformers' flash-attention integration does.
    `checked`: whether their values need no check (made here, valid by construction, or already
    checked); `new_source`: what newly made or given offsets came from, for
    `_remember_offsets` (None when reused). Every layer is handed the same tensors: the first
    makes or checks the offsets, the others reuse them (see `_remembered`)."""
    if attention_mask is not None or query.shape[0] != 1:
        return None
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    rows = (query.shape[2], key.shape[2])  # what the offsets were checked against
    if all(kwargs.get(n) is not None for n in names):
        cu_q, cu_k, max_q, max_k = given = tuple(kwargs[n] for n in names)
        source = given + rows
        offsets = _remembered(source)
        if offsets is not None:
            return offsets, True, None
        return (cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)), False, source
    positions = kwargs.get("position_ids")
    total = query.shape[2]
    if positions is None or total == 1 or key.shape[2] != total or positions.numel() != total:
        return None
    source = (positions,) + rows
    offsets = _remembered(source)
    if offsets is not None:
        return offsets, True, None
    offsets = _offsets_from_positions(positions)
    return None if offsets is None else (offsets, True, source)


# Within one forward of a patched model every layer is handed the same position_ids /
# cu_seq_lens tensors: the first layer makes or checks the offsets, the others reuse them (one
# host read and one check of the values a forward, not one per layer: about 6 and 10 small
# launches a layer). The reuse is scoped to the forward (patch's hooks open and close it), when
# no caller code can write to those tensors (a write through numpy or .data would not show in
# their version counter). Outside a patched model's forward (attn_implementation="fusedlm"
# alone, gradient checkpointing's recomputation), under torch.compile (it traces instead) and
# for inference tensors (no version counter), every layer makes and checks its own.
_offsets_scope = None  # None, or [the last (source refs, versions, other values, offsets)]


def _open_offsets_scope(module, args):
    global _offsets_scope
    _offsets_scope = [None]


def _close_offsets_scope(module, args, output):
    global _offsets_scope
    _offsets_scope = None


def _offsets_key(source):
    """(tensors, the rest) of what offsets came from, or None where reuse is not allowed."""
    tensors = tuple(t for t in source if torch.is_tensor(t))
    if _offsets_scope is None or torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
        return None
    return tensors, tuple(v for v in source if not torch.is_tensor(v))


def _remembered(source):
    key, scope = _offsets_key(source), _offsets_scope
    if key is None or scope[0] is None:
        return None
    (tensors, rest), (refs, versions, last_rest, offsets) = key, scope[0]
    same = (len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors))
            and versions == tuple(t._version for t in tensors) and rest == last_rest)
    return offsets if same else None


def _remember_offsets(source, offsets):
    key, scope = _offsets_key(source), _offsets_scope
    if key is not None:
        tensors, rest = key
        scope[0] = (tuple(weakref.ref(t) for t in tensors), tuple(t._version for t in tensors),
                    rest, offsets)


def _offsets_from_positions(positions):
    """(cu, cu, longest, longest) for one row of sequences whose positions restart (at their
    minimum), or None when they do not start at the row's first token; one host read."""
    positions = positions.reshape(-1)
    total = positions.numel()
    starts = (positions == positions.min()).nonzero().view(-1).to(torch.int32)
    cu = torch.cat([starts, starts.new_tensor([total])])
    first, longest = torch.stack([cu[0], cu.diff().max()]).tolist()  # one read
    if first != 0:  # not sequences restarting at a common first position
        return None
    return cu, cu, longest, longest


# Base models that use position_ids themselves (rotary embeddings) but do not hand them to their
# attention, which then cannot see a padding-free row's sequence boundaries: `patch` gives them
# a hook that turns restarting position_ids into the collator's cu_seq_lens_q/k keywords.
_POSITIONS_NOT_PASSED_DOWN = ("ModernBertModel",)


def _offsets_hook(module, args, kwargs):
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    positions = kwargs.get("position_ids")
    if (getattr(module.config, "_attn_implementation", None) != ATTN_NAME or positions is None
            or kwargs.get("attention_mask") is not None or any(kwargs.get(n) is not None for n in names)
            or positions.dim() != 2 or positions.shape[0] != 1 or positions.shape[1] < 2):
        return None
    offsets = _offsets_from_positions(positions)
    if offsets is None:
        return None
    return args, dict(kwargs, **dict(zip(names, offsets)))


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """The mask transformers hands fusedlm's attention: the 2-D padding mask of the keys, as
    flash-attention's mask function gives it, but never replaced by None after asking whether
    it is all ones: that question reads the mask on the host (a wait for the GPU, and a graph
    break under torch.compile). Causality comes from the attention's is_causal; windowed or
    chunked masks are not served (see _UNSUPPORTED_ATTENTION)."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register():
    """Register "fusedlm" with transformers' AttentionInterface and AttentionMaskInterface, so
    that `attn_implementation="fusedlm"` (from_pretrained, from_config,
    set_attn_implementation) runs fusedlm's attention with padding masks intact. `import
    fusedlm` does this once transformers' modeling code is imported (see
    fusedlm._after_import); calling it again is harmless."""
    _, masking_utils, AttentionInterface = _transformers()
    AttentionInterface.register(ATTN_NAME, _attention_forward)
    masking_utils.AttentionMaskInterface.register(ATTN_NAME, _padding_mask)



# ---------------------------------------------------------------------------------------------
# RMSNorm of the Llama family: weight * (x / rms(x)), in float32, back in x's dtype.

_LLAMA_RMS = "return self.weight * hidden_states.to(input_dtype)"


@functools.lru_cache(maxsize=None)
def _llama_rms_norm(cls) -> bool:
    """Is `cls` a transformers RMSNorm that computes what fusedlm.nn.RMSNorm does (Llama's,
    Mistral's, Qwen2/3's)? Read from its forward; Gemma's (1 + weight) and others are not."""
    if not (cls.__name__.endswith("RMSNorm") and cls.__module__.startswith("transformers")):
        return False
    try:
        return _LLAMA_RMS in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _fused_rms_norm(child):
    """fusedlm.nn.RMSNorm in place of a Llama-style RMSNorm, sharing its weight Parameter."""
    w = child.weight
    new = RMSNorm(tuple(w.shape), eps=child.variance_epsilon, device="meta")
    new.weight = w
    return new.train(child.training)


# ---------------------------------------------------------------------------------------------
# Loss forwards: base model -> labelled rows -> head transform -> fused loss.

# BERT's "dense -> dropout -> add & norm" (BertSelfOutput.forward, BertOutput.forward and the
# copies other models make of them), statement by statement as ast.unparse writes it.
_DROPOUT_ADD_NORM = ("hidden_states = self.dense(hidden_states)",
                     "hidden_states = self.dropout(hidden_states)",
                     "hidden_states = self.LayerNorm(hidden_states + input_tensor)",
                     "return hidden_states")


@functools.lru_cache(maxsize=None)
def _code_is(cls, method, args, statements) -> bool:
    """Is cls.<method>(*args) exactly these statements (as ast.unparse writes them)? Read from
    its code, so that a class that computes anything else is left alone."""
    import ast
    import textwrap
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(cls, method))))
    except (AttributeError, OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0] if tree.body else None
    return (isinstance(fn, ast.FunctionDef) and tuple(a.arg for a in fn.args.args) == args
            and tuple(ast.unparse(stmt) for stmt in fn.body) == statements)


def _is_dropout_add_norm(cls) -> bool:
    """Is cls.forward(hidden_states, input_tensor) exactly BERT's dense, dropout, add & norm?"""
    return _code_is(cls, "forward", ("self", "hidden_states", "input_tensor"), _DROPOUT_ADD_NORM)


def _dropout_add_norm_forward(self, hidden_states, input_tensor):
    """LayerNorm(dropout(dense(hidden_states)) + input_tensor), the dropout and the add in the
    norm's kernels (fusedlm.layer_norm's dropout_p)."""
    p = self.dropout.p if self.training else 0.0
    return self.LayerNorm(self.dense(hidden_states), input_tensor, dropout_p=p)[0]


def _fuse_dropout_add_norm(model):
    """The modules whose forward is BERT's dense, dropout, add & norm, over a fusedlm
    LayerNorm, given the fused forward (an instance attribute: unpatch deletes it)."""
    fused = []
    for m in model.modules():
        if (_is_dropout_add_norm(type(m)) and isinstance(getattr(m, "LayerNorm", None), LayerNorm)
                and isinstance(getattr(m, "dropout", None), torch.nn.Dropout)):
            m.forward = types.MethodType(_dropout_add_norm_forward, m)
            fused.append(m)
    return fused


# BERT's feed-forward (BertLayer.feed_forward_chunk over BertIntermediate.forward and a
# dropout-add-norm output) and GPT-2's MLP (GPT2MLP.forward), as ast.unparse writes them.
_FEED_FORWARD_CHUNK = ("intermediate_output = self.intermediate(attention_output)",
                       "layer_output = self.output(intermediate_output, attention_output)",
                       "return layer_output")
_INTERMEDIATE = ("hidden_states = self.dense(hidden_states)",
                 "hidden_states = self.intermediate_act_fn(hidden_states)",
                 "return hidden_states")
_GPT2_MLP = ("hidden_states = self.c_fc(hidden_states)", "hidden_states = self.act(hidden_states)",
             "hidden_states = self.c_proj(hidden_states)",
             "hidden_states = self.dropout(hidden_states)", "return hidden_states")
_GATED_MLP = ("down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
              "return down_proj")
_GLU_MLP = ("input, gate = self.Wi(hidden_states).chunk(2, dim=-1)",  # ModernBertMLP
            "return self.Wo(self.drop(self.act(input) * gate))")
_FF_CHUNK = ("x = self.lin1(input)", "x = self.activation(x)", "x = self.lin2(x)",  # DistilBERT's FFN
             "x = self.dropout(x)", "return x")


def _mlp_activation(fn):
    """fusedlm.ops.mlp's name for a transformers activation module, or None."""
    from transformers import activations as A
    if type(fn) is torch.nn.ReLU:
        return "relu"
    if type(fn) in (torch.nn.SiLU, getattr(A, "SiLUActivation", None)):
        return "silu"
    if type(fn) is A.GELUActivation:  # F.gelu, or the same erf formula in Python
        return "gelu"
    if type(fn) in (A.NewGELUActivation, getattr(A, "GELUTanh", None),
                    getattr(A, "PytorchGELUTanh", None)):
        return "gelu_tanh"
    return None


def _is_conv1d(m):
    """transformers' Conv1D: y = x @ weight + bias, weight (in, out)."""
    return (type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")
            and isinstance(getattr(m, "weight", None), torch.Tensor)
            and isinstance(getattr(m, "bias", None), torch.Tensor))


# The activation's name, on each fused module (unpatch deletes it): an instance attribute, not
# an argument, since transformers counts a chunked feed-forward's parameters.
_MLP_ACTIVATION = "_fusedlm_mlp_activation"


def _bert_feed_forward(self, attention_output):
    up, out = self.intermediate.dense, self.output
    y = fused_mlp(attention_output, up.weight, up.bias, out.dense.weight, out.dense.bias,
                  getattr(self, _MLP_ACTIVATION))
    if isinstance(out.LayerNorm, LayerNorm):  # dropout and residual add in the norm's kernels
        p = out.dropout.p if out.training else 0.0
        return out.LayerNorm(y, attention_output, dropout_p=p)[0]
    return out.LayerNorm(out.dropout(y) + attention_output)


def _gpt2_mlp_forward(self, hidden_states):
    fc, proj = self.c_fc, self.c_proj
    return self.dropout(fused_mlp(hidden_states, fc.weight.t(), fc.bias, proj.weight.t(), proj.bias,
                                  getattr(self, _MLP_ACTIVATION)))


def _gated_mlp_forward(self, x):
    up = self.up_proj
    return fused_mlp(x, up.weight, up.bias, self.down_proj.weight, self.down_proj.bias,
                     getattr(self, _MLP_ACTIVATION), gate_weight=self.gate_proj.weight,
                     gate_bias=self.gate_proj.bias)


def _distilbert_ff_chunk(self, input):  # (one parameter: transformers counts a chunk function's)
    return self.dropout(fused_mlp(input, self.lin1.weight, self.lin1.bias, self.lin2.weight,
                                  self.lin2.bias, getattr(self, _MLP_ACTIVATION)))


def _glu_mlp_forward(self, hidden_states):
    """ModernBERT's MLP: Wi's first half activated, times its second half, then Wo."""
    if self.training and self.drop.p > 0:  # a dropout between the product and Wo: its own code
        return type(self).forward(self, hidden_states)
    n, w, b = self.Wo.in_features, self.Wi.weight, self.Wi.bias
    half = lambda t, i: None if t is None else t[i * n:(i + 1) * n]  # noqa: E731
    return fused_mlp(hidden_states, half(w, 1), half(b, 1), self.Wo.weight, self.Wo.bias,
                     getattr(self, _MLP_ACTIVATION), gate_weight=half(w, 0), gate_bias=half(b, 0))


def _linears(m, *names):
    return all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in names)


def _bert_activation(m):
    """The activation of a BERT layer's feed-forward whose parts are BERT's, else None."""
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if (_code_is(type(inter), "forward", ("self", "hidden_states"), _INTERMEDIATE)
            and _is_dropout_add_norm(type(out)) and _linears(inter, "dense") and _linears(out, "dense")):
        return getattr(inter, "intermediate_act_fn", None)
    return None


def _has_dropout(m, name):
    return isinstance(getattr(m, name, None), torch.nn.Dropout)


# The MLPs fusedlm.ops.mlp runs, by the method whose code they have: (method, its parameters,
# its statements, the module's activation where its parts are what that code expects (else
# None), the fused method).
_MLPS = (
    ("feed_forward_chunk", ("self", "attention_output"), _FEED_FORWARD_CHUNK, _bert_activation,
     _bert_feed_forward),
    ("forward", ("self", "hidden_states"), _GPT2_MLP,
     lambda m: (getattr(m, "act", None) if _is_conv1d(getattr(m, "c_fc", None))
                and _is_conv1d(getattr(m, "c_proj", None)) and _has_dropout(m, "dropout") else None),
     _gpt2_mlp_forward),
    ("forward", ("self", "x"), _GATED_MLP,
     lambda m: getattr(m, "act_fn", None) if _linears(m, "gate_proj", "up_proj", "down_proj") else None,
     _gated_mlp_forward),
    ("ff_chunk", ("self", "input"), _FF_CHUNK,
     lambda m: (getattr(m, "activation", None) if _linears(m, "lin1", "lin2")
                and _has_dropout(m, "dropout") else None),
     _distilbert_ff_chunk),
    ("forward", ("self", "hidden_states"), _GLU_MLP,
     lambda m: (getattr(m, "act", None) if _linears(m, "Wi", "Wo")
                and m.Wi.out_features == 2 * m.Wo.in_features and _has_dropout(m, "drop") else None),
     _glu_mlp_forward),
)


def _fuse_mlps(model):
    """[(module, method name)] given fusedlm.ops.mlp: the modules whose MLP code is one of
    _MLPS, with an activation the op knows."""
    fused = []
    for m in model.modules():
        for method, params, code, activation_of, fused_method in _MLPS:
            if not _code_is(type(m), method, params, code):
                continue
            activation = _mlp_activation(activation_of(m))
            if activation is not None:
                setattr(m, _MLP_ACTIVATION, activation)
                setattr(m, method, types.MethodType(fused_method, m))
                fused.append((m, method))
            break
    return fused


def _base_outputs(model, kwargs):
    base = getattr(model, model.base_model_prefix)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs["return_dict"] = True
    return base(**kwargs)


def _mlm_head(model):
    """(transform on hidden rows, decoder Linear) of each supported masked-LM head."""
    name = type(model).__name__
    if name in ("BertForMaskedLM", "BertForPreTraining"):
        p = model.cls.predictions
        return p.transform, p.decoder
    if name == "RobertaForMaskedLM":
        h = model.lm_head
        gelu = torch.nn.functional.gelu
        return (lambda x: h.layer_norm(gelu(h.dense(x)))), h.decoder
    if name == "DistilBertForMaskedLM":
        return (lambda x: model.vocab_layer_norm(model.activation(model.vocab_transform(x)))), model.vocab_projector
    if name == "ModernBertForMaskedLM":  # its sparse_prediction is what the fused loss always does
        return model.head, model.decoder
    return None


@functools.lru_cache(maxsize=None)
def _honours_num_items(cls) -> bool:
    """Does the class's own loss honour `num_items_in_batch` (which Trainer passes with gradient
    accumulation)? Those that compute it through transformers' `loss_function` divide the sum
    over labelled tokens by it; the others (BertForMaskedLM, BertForPreTraining, ... in
    transformers 5) average over the batch whatever it says, and so must their patched loss.
    Read from the forward's source: which classes do it changes between transformers versions."""
    try:
        return "self.loss_function(" in inspect.getsource(cls.forward)
    except (OSError, TypeError) as e:
        raise RuntimeError(f"fusedlm.patch cannot read {cls.__name__}.forward's source to learn "
                           f"how its loss is reduced ({e})") from e


def _fused_loss(model, num_items, hidden, weight, labels, bias, **options):
    """lm_loss reduced as the model's own loss would be."""
    if num_items is None or not _honours_num_items(type(model)):
        return lm_loss(hidden, weight, labels, bias, **options)
    total = lm_loss(hidden, weight, labels, bias, reduction="sum", **options)
    return total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)


def _mlm_loss(model, num_items, hidden, labels):
    transform, decoder = _mlm_head(model)
    h, y = labelled_rows(hidden, labels)
    return _fused_loss(model, num_items, transform(h), decoder.weight, y, decoder.bias)


def _mlm_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    if labels is None:
        return self._fusedlm_original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    from transformers.modeling_outputs import MaskedLMOutput
    num_items = kwargs.pop("num_items_in_batch", None)  # for the loss, not the base model
    out = _base_outputs(self, dict(kwargs, input_ids=input_ids, attention_mask=attention_mask))
    return MaskedLMOutput(loss=_mlm_loss(self, num_items, out[0], labels), logits=None,
                          hidden_states=out.hidden_states, attentions=out.attentions)


def _pretraining_forward(self, input_ids=None, attention_mask=None, labels=None,
                         next_sentence_label=None, **kwargs):
    if labels is None or next_sentence_label is None:
        # Hugging Face's BertForPreTraining returns a loss only when both labels are given; with
        # one of them it returns the logits, which only the original forward computes.
        return self._fusedlm_original_forward(input_ids=input_ids, attention_mask=attention_mask,
                                              labels=labels,
                                              next_sentence_label=next_sentence_label, **kwargs)
    from transformers.models.bert.modeling_bert import BertForPreTrainingOutput
    num_items = kwargs.pop("num_items_in_batch", None)  # for the loss, not the base model
    out = _base_outputs(self, dict(kwargs, input_ids=input_ids, attention_mask=attention_mask))
    loss = _mlm_loss(self, num_items, out[0], labels)
    nsp_logits = self.cls.seq_relationship(out[1])
    loss = loss + torch.nn.functional.cross_entropy(nsp_logits.view(-1, 2).float(),
                                                    next_sentence_label.view(-1))
    return BertForPreTrainingOutput(loss=loss, prediction_logits=None,
                                    seq_relationship_logits=nsp_logits,
                                    hidden_states=out.hidden_states, attentions=out.attentions)


def _causal_forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    if labels is None:
        return self._fusedlm_original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    from transformers import modeling_outputs
    num_items = kwargs.pop("num_items_in_batch", None)  # for the loss, not the base model
    kwargs.pop("logits_to_keep", None)  # which logits to build: none are
    out = _base_outputs(self, dict(kwargs, input_ids=input_ids, attention_mask=attention_mask))
    hidden = out[0]
    loss = _fused_loss(self, num_items, hidden, self.lm_head.weight, labels.to(hidden.device),
                       self.lm_head.bias, shift=True)
    output = (modeling_outputs.CausalLMOutputWithCrossAttentions
              if type(self).__name__ == "GPT2LMHeadModel" else modeling_outputs.CausalLMOutputWithPast)
    return output(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                  hidden_states=out.hidden_states, attentions=out.attentions)


_LOSS_FORWARDS = {
    "BertForMaskedLM": _mlm_forward,
    "RobertaForMaskedLM": _mlm_forward,
    "DistilBertForMaskedLM": _mlm_forward,
    "ModernBertForMaskedLM": _mlm_forward,
    "BertForPreTraining": _pretraining_forward,
    "GPT2LMHeadModel": _causal_forward,
    # The Llama family: RoPE'd, grouped-query attention; RMSNorm; an untied or tied lm_head.
    "LlamaForCausalLM": _causal_forward,
    "MistralForCausalLM": _causal_forward,
    "Qwen2ForCausalLM": _causal_forward,
    "Qwen3ForCausalLM": _causal_forward,
}


# ---------------------------------------------------------------------------------------------

def patch(model, *, attention=True, layer_norm=True, mlp=True, loss=True) -> PatchReport:
    """Patch a transformers model in place (see the module docstring); returns the report.
    Patching a patched model is an error: unpatch first."""
    transformers, _, _ = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if hasattr(model, _STATE):
        raise ValueError("model is already patched by fusedlm; call fusedlm.unpatch(model) first")
    name = type(model).__name__
    report = PatchReport(name)
    state = {"attn": None, "norms": [], "forward": False, "hooks": [], "fused": [], "mlps": []}

    why_not_attention = _unsupported_attention_config(model.config, model) if attention else None
    if why_not_attention is not None:
        report.left_alone.append(("attention", why_not_attention))
    elif attention:
        register()
        state["attn"] = model.config._attn_implementation
        for m in model.modules():  # every sub-config (encoder, decoder) a module holds
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = ATTN_NAME
        report.patched.append(f"attention: '{state['attn']}' -> '{ATTN_NAME}' (masks through "
                              "AttentionMaskInterface)")
        state["hooks"] += [model.register_forward_pre_hook(_open_offsets_scope),
                           model.register_forward_hook(_close_offsets_scope, always_call=True)]
        for m in model.modules():
            if type(m).__name__ in _POSITIONS_NOT_PASSED_DOWN:
                state["hooks"].append(m.register_forward_pre_hook(_offsets_hook, with_kwargs=True))
                report.patched.append(f"{type(m).__name__}: padding-free rows' sequence boundaries "
                                      "from restarting position_ids (it does not pass them to "
                                      "its attention)")
    else:
        report.left_alone.append(("attention", "attention=False"))

    if layer_norm:
        rms_classes = {type(m) for m in model.modules() if _llama_rms_norm(type(m))}
        originals = [(parent, child_name, child) for parent in model.modules()
                     for child_name, child in parent._modules.items()
                     if type(child) is torch.nn.LayerNorm or type(child) in rms_classes]
        swapped = replace_norms(model, rms=False)
        swap_modules(model, {cls: _fused_rms_norm for cls in rms_classes})
        state["norms"] = originals
        report.patched.append(f"LayerNorm: {len(swapped)} module(s) -> fusedlm.nn.LayerNorm")
        for cls in sorted(rms_classes, key=lambda c: c.__name__):
            n = sum(type(old) is cls for _, _, old in originals)
            report.patched.append(f"{cls.__name__}: {n} module(s) -> fusedlm.nn.RMSNorm")
        state["fused"] = _fuse_dropout_add_norm(model)
        for cls in sorted({type(m).__name__ for m in state["fused"]}):
            n = sum(type(m).__name__ == cls for m in state["fused"])
            report.patched.append(f"{cls}: {n} module(s): dropout and residual add in the "
                                  "LayerNorm's kernels")
        others = {type(m).__name__ for m in model.modules()
                  if "norm" in type(m).__name__.lower() and type(m).__module__.startswith("transformers")}
        for other in sorted(others):
            report.left_alone.append((other, "neither torch.nn.LayerNorm nor an RMSNorm computing "
                                             "weight * x / rms(x); its forward may differ"))
    else:
        report.left_alone.append(("LayerNorm", "layer_norm=False"))

    if mlp:
        state["mlps"] = _fuse_mlps(model)
        for cls in sorted({type(m).__name__ for m, _ in state["mlps"]}):
            n = sum(type(m).__name__ == cls for m, _ in state["mlps"])
            report.patched.append(f"{cls}: {n} module(s): the MLP as fusedlm.ops.mlp (its "
                                  "activation recomputed in the backward, not stored)")
    else:
        report.left_alone.append(("MLP", "mlp=False"))

    if loss and name in _LOSS_FORWARDS:
        model._fusedlm_original_forward = model.forward
        model.forward = types.MethodType(_LOSS_FORWARDS[name], model)
        state["forward"] = True
        report.patched.append("loss: fused projection + cross-entropy when labels are given "
                              "(logits=None in that case)")
    elif loss:
        report.left_alone.append(("loss", f"no fused loss path for {name}"))
    setattr(model, _STATE, state)
    return report


def unpatch(model):
    """Undo `patch`: the original LayerNorm modules, attention implementation and forward."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("model is not patched by fusedlm")
    for m in state["fused"]:
        del m.forward
    for m, method in state["mlps"]:
        delattr(m, method)
        delattr(m, _MLP_ACTIVATION)
    for parent, child_name, child in state["norms"]:
        setattr(parent, child_name, child)
    if state["attn"] is not None:
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and getattr(cfg, "_attn_implementation", None) == ATTN_NAME:
                cfg._attn_implementation = state["attn"]
    for hook in state["hooks"]:
        hook.remove()
    if state["forward"]:
        del model.forward
        del model._fusedlm_original_forward
    delattr(model, _STATE)
    return model
