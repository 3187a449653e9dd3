"""The architecture table's record types: ArchSpec (one model family) and SmoothMapping (one AWQ/SmoothQuant fold).

An ArchSpec names the ModuleList of decoder blocks and the quantizable linears of one block as
groups in execution order (q/k/v, then o, then gate/up, then down for Llama-like blocks); a group's
linears read one input tensor (parallel blocks put attention's and the MLP's input linears in one group).
A linear name is a module path inside the block, or the path of a 3-D fused-experts parameter
([experts, out, in] as transformers 5 stores MoE experts, or [experts, in, out]: ExpertLayout), which expands to
one linear per expert.
`smooth` lists AWQ/SmoothQuant mappings (previous op -> the linears that read its output).
Families whose blocks differ (dense and MoE blocks in one model) list every block kind's linears and
mark the ones a block may lack `optional`; a mapping applies in the blocks that hold all it names (and none of
its `absent`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QForgeError

PREV_ROWS = {"all": 1, "up_half": 2, "v_third": 3}  # equal parts of prev's rows; the linears read the last


@dataclass(frozen=True)
class SmoothMapping:
    """`prev` (a norm or linear inside the block) feeds every linear in `linears` (AWQ, SmoothQuant).

    `balance`: modules that read prev's output too but are never quantized (MoE routers): scaled with
    the linears so the function is unchanged. `prev_rows` says which of prev's output rows the linears read:
    "all"; "up_half": prev is a fused gate/up (a linear [2·I, in], or a fused-experts parameter
    [experts, 2·I, in] whose linears are fused experts too, one scale vector per expert) and the linears
    read act(gate)·up, so only the up rows are divided; "v_third": prev is a fused q/k/v linear whose last
    third (v) the linears read — it fits only when there are as many key/value heads as query heads.
    `absent`: the mapping fits only blocks without these, for a family whose blocks lack some of prev's readers
    (Gemma 4: attention without v_proj or without k/v), where a mapping naming fewer linears would otherwise also
    fit the blocks that hold more, and leave those unscaled.
    """

    prev: str
    linears: tuple[str, ...]
    balance: tuple[str, ...] = ()
    prev_rows: str = "all"
    absent: tuple[str, ...] = ()

    def __post_init__(self):
        if self.prev_rows not in PREV_ROWS:
            raise QForgeError(f"SmoothMapping {self.prev}: prev_rows must be one of {', '.join(PREV_ROWS)}, "
                              f"not {self.prev_rows!r}")


@dataclass(frozen=True)
class ExpertLayout:
    """How a family stores its fused experts (3-D parameters `<...>.experts.gate_up_proj` / `.down_proj`, or
    `.up_proj` / `.down_proj` without a gate) and calls them. `<param>_bias` parameters beside them ([experts, out],
    GPT-OSS) are found by name.

    stored: "out_in": [experts, out, in] (transformers 5's MoE blocks); "in_out": [experts, in, out], read as
      x @ W[e] (Llama 4, GPT-OSS).
    gate_up: the gate/up outputs as "halves" (gate then up) or "interleaved" (gate, up, gate, ...: GPT-OSS), or
      "none": no gate, the first parameter is `up_proj` and down_proj reads act_fn(up) (Nemotron-H's squared ReLU).
    routing: "top_k": forward(hidden [tokens, in], top_k_index [tokens, k], ...), an expert reads the tokens
      routed to it; "scaled": forward(x [experts·tokens, in]), every token once per expert, multiplied by its
      router score (0 where not routed: Llama 4).
    glu: down_proj's input from gate/up: "act_fn" (module.act_fn(gate)·up) or "module" (the experts module's
      own `_apply_gate(gate_up)`: GPT-OSS's clamped SwiGLU, (up + 1)·glu, which no up -> down fold keeps).
    """

    stored: str = "out_in"
    gate_up: str = "halves"
    routing: str = "top_k"
    glu: str = "act_fn"

    def __post_init__(self):
        for field, allowed in (("stored", ("out_in", "in_out")), ("gate_up", ("halves", "interleaved", "none")),
                               ("routing", ("top_k", "scaled")), ("glu", ("act_fn", "module"))):
            if getattr(self, field) not in allowed:
                raise QForgeError(f"ExpertLayout.{field} must be one of {', '.join(allowed)}, "
                                  f"not {getattr(self, field)!r}")

    @property
    def input_param(self) -> str:
        """The fused parameter that reads the experts' input (down_proj reads its activation)."""
        return "up_proj" if self.gate_up == "none" else "gate_up_proj"

    def gate_up_rows(self, n: int) -> tuple[slice, slice]:
        """The gate rows and the up rows of a gate/up weight with `n` output rows."""
        if self.gate_up == "interleaved":
            return slice(0, n, 2), slice(1, n, 2)
        return slice(0, n // 2), slice(n // 2, n)


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                          # dotted path of the decoder-block ModuleList in the CausalLM
    groups: tuple[tuple[str, ...], ...]  # linears per block, in execution order
    smooth: tuple[SmoothMapping, ...] = ()
    norm_plus_one: bool = False          # Gemma RMSNorm scales by (1 + w)
    optional: frozenset[str] = frozenset()  # linears some blocks lack (dense vs MoE blocks)
    fp_linears: tuple[str, ...] = ()     # linears that stay unquantized (a shared expert's 1-output gate)
    tuple_blocks: bool = False           # the model reads a block's output as a tuple (Bloom, GPT-J, Bamba)
    experts: ExpertLayout = ExpertLayout()  # how fused experts are stored and called
    # the keyword argument, a mapping the model hands every block, through which blocks leave state for later
    # ones (Gemma 4's shared_kv_states); code that skips blocks puts back what the skipped ones would have left
    carried: str | None = None

    def __post_init__(self):
        names = set(self.linear_names)
        unknown = (set(self.optional) | {n for m in self.smooth for n in m.linears}) - names
        if unknown:
            raise QForgeError(f"ArchSpec {self.blocks}: {', '.join(sorted(unknown))} not among its groups' linears")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g)
