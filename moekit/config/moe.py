"""The configuration of one MoE layer: router kind, routing spec, experts, shared experts and balancing."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from moekit._validate import check_choice, check_float, check_int, fail
from moekit.experts.layout import ExpertLayout
from moekit.routing.spec import RoutingSpec

ROUTERS = ("token_choice", "expert_choice", "soft", "hash", "token_table")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer. Fields for every router kind:
    routing            num_experts and top_k (hash: experts per token; expert choice: k of C = ceil(k*T*cf/E)), and
                       for token choice the whole routing math.
    router             token_choice, expert_choice (each expert takes C tokens), soft (Soft MoE slots), hash, or
                       token_table (DeepSeek-V4's hash layers: a [table_vocab, k] table of the token id picks the
                       experts, the learned router weighs them by the spec's scores, renormalisation and scaling).
    expert_hidden      F, the hidden width of one routed expert.
    num_shared_experts, shared_hidden  always-on experts (hidden width shared_hidden, default
                       num_shared_experts * expert_hidden); shared_gate scales them by sigmoid(x·w) (Qwen2-MoE).
    backend            experts backend name (see moekit.experts.BACKENDS); 'auto' picks the fast one.
    matmul             the grouped backend's matmul (moekit.experts.backends.MATMULS); 'auto' picks by size.
    A learned router's (token choice, expert choice):
    router_bias        a learned bias in the router linear (GPT-OSS).
    jitter             multiplicative router-input noise U[1-eps, 1+eps] while training.
    z_loss_coef        ST-MoE router z-loss.
    capacity_factor    token choice: None is dropless, else each expert takes at most ceil(k*T*cf/E) assignments,
                       dropped by drop_policy ('position' or 'score'); expert choice: each takes exactly that many
                       (default 1.0).
    Token choice only:
    aux_loss_coef      Switch/GShard loss over the micro-batch; seq_aux_loss_coef: DeepSeek-V3's per sequence.
    bias_update_rate   u of the auxiliary-loss-free balancer (needs routing.selection_bias).
    drop_policy        which assignments capacity drops.
    Soft MoE only:
    slots_per_expert   slots per expert.
    A field set for a router kind that does not read it is an error, never silently ignored.
    """

    routing: RoutingSpec
    expert_hidden: int
    router: Literal["token_choice", "expert_choice", "soft", "hash", "token_table"] = "token_choice"
    layout: ExpertLayout = field(default_factory=ExpertLayout)
    router_bias: bool = False
    num_shared_experts: int = 0
    shared_hidden: int | None = None
    shared_gate: bool = False
    capacity_factor: float | None = None
    drop_policy: Literal["position", "score"] = "position"
    aux_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    jitter: float = 0.0
    slots_per_expert: int = 1
    backend: str = "auto"
    matmul: str = "auto"
    table_vocab: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.routing, RoutingSpec):
            fail("routing", self.routing, "a RoutingSpec")
        check_choice("router", self.router, ROUTERS)
        check_int("expert_hidden", self.expert_hidden, 1)
        check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_hidden is not None:
            check_int("shared_hidden", self.shared_hidden, 1)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, 0.0, lo_open=True)
        if self.router == "expert_choice" and self.capacity_factor is None:
            object.__setattr__(self, "capacity_factor", 1.0)
        check_choice("drop_policy", self.drop_policy, ("position", "score"))
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            check_float(name, getattr(self, name), 0.0)
        check_float("jitter", self.jitter, 0.0, 1.0)
        check_int("slots_per_expert", self.slots_per_expert, 1)
        if self.bias_update_rate > 0 and not self.routing.selection_bias:
            fail("bias_update_rate", self.bias_update_rate, "0 unless routing.selection_bias=True")
        if self.router not in ("token_choice", "token_table") and self.routing.selection_bias:
            fail("routing.selection_bias", True, "False for the expert_choice, soft and hash routers")
        if self.router == "token_table":
            check_int("table_vocab", self.table_vocab, 1)
        self._check_router_fields()
        from moekit.experts.backends import BACKENDS, MATMULS

        check_choice("backend", self.backend, ("auto", *BACKENDS))
        check_choice("matmul", self.matmul, tuple(MATMULS))
        if self.matmul != "auto" and self.backend not in ("auto", "grouped"):
            fail("matmul", self.matmul, f"'auto' with backend={self.backend!r} (only the grouped backend has one)")

    def _check_router_fields(self) -> None:
        """Every field a router kind does not read stays at its default (see the class docstring)."""
        token_choice_only = ("aux_loss_coef", "seq_aux_loss_coef", "bias_update_rate", "drop_policy")
        not_learned = ("router_bias", "jitter", "z_loss_coef", "capacity_factor", *token_choice_only)
        unread = {
            "token_choice": ("slots_per_expert", "table_vocab"),
            "token_table": (*token_choice_only, "capacity_factor", "slots_per_expert"),
            "expert_choice": (*token_choice_only, "slots_per_expert", "table_vocab"),
            "soft": (*not_learned, "table_vocab"),
            "hash": (*not_learned, "slots_per_expert", "table_vocab"),
        }[self.router]
        defaults = {f.name: f.default for f in fields(self)}
        for name in unread:
            if getattr(self, name) != defaults[name]:
                fail(name, getattr(self, name), f"{defaults[name]!r}: router={self.router!r} does not read it")

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared expert block (0 when there is none)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_hidden if self.shared_hidden is not None else self.num_shared_experts * self.expert_hidden

    @property
    def breaks_causality(self) -> bool:
        """Expert choice and soft MoE mix information across the tokens of a batch or sequence."""
        return self.router in ("expert_choice", "soft")

    def describe(self) -> str:
        if self.router == "expert_choice":
            cf = f"{self.capacity_factor:g}"
            s = f"expert choice: each of {self.num_experts} experts takes its best ceil({self.top_k}*T*{cf}/E) tokens"
        elif self.router == "soft":
            s = f"soft MoE: {self.num_experts} experts x {self.slots_per_expert} slots"
        elif self.router == "hash":
            s = f"hash routing to {self.top_k} of {self.num_experts} experts"
        elif self.router == "token_table":
            s = f"a token-id table picks {self.top_k} of {self.num_experts} experts"
            s += f", weighted by {self.routing.score_func} scores"
        else:
            s = self.routing.describe()
            if self.capacity_factor is not None:
                s += f", capacity factor {self.capacity_factor:g} (drop by {self.drop_policy})"
        if self.num_shared_experts:
            s += f"; {self.num_shared_experts} shared expert(s) of width {self.shared_width}"
            s += " behind a sigmoid gate" if self.shared_gate else ""
        return s
