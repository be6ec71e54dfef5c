"""What a token-choice router does, as data. A published family is one RoutingSpec, not a new class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moekit._validate import check_choice, check_float, check_int, fail

ScoreFunc = Literal["softmax", "sigmoid", "sqrtsoftplus", "sparsemixer"]
SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus", "sparsemixer")
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    """Token-choice routing math.

    score_func        softmax, sigmoid or sqrtsoftplus (DeepSeek-V4: sqrt(softplus(logit))) of the router logits, or
                      sparsemixer (Phi-3.5-MoE): the k experts are picked
                      one after another by the largest remaining logit, each weighted by a softmax over the logits
                      within a relative distance 2·sparsemixer_eps of it (inference semantics; training uses the
                      same deterministic pick, not Phi's Gumbel sampling with its Heun-estimated gradient).
    softmax_after_topk  select top-k on the raw logits and take the softmax over the k values only (GPT-OSS);
                      otherwise the score function runs over all experts first (Mixtral, Qwen, DeepSeek).
    n_group, topk_group  group-limited selection: experts split into n_group equal groups, only the topk_group best
                      groups may be chosen (DeepSeek-V2/V3); masked groups get -inf.
    group_score       how a group is scored: its max (DeepSeek-V2) or the sum of its top-2 (DeepSeek-V3).
    selection_bias    a per-expert bias added to the scores for selection only, never to the weights
                      (DeepSeek-V3's e_score_correction_bias, the auxiliary-loss-free balancer).
    normalize         divide the k weights by their p-norm (+ normalize_eps); p=1 is the usual renormalisation.
    scaling_factor    multiply the final weights (DeepSeek's routed_scaling_factor).
    apply_to          'output' (weights scale the expert outputs) or 'input' (Llama 4 scales the expert input).
    router_dtype      'float32' (logits and scores in fp32) or 'model' (the activations' dtype).
    """

    num_experts: int
    top_k: int
    score_func: ScoreFunc = "softmax"
    softmax_after_topk: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "max"
    selection_bias: bool = False
    normalize: bool = False
    normalize_p: float = 1.0
    normalize_eps: float = 0.0
    scaling_factor: float = 1.0
    apply_to: Literal["output", "input"] = "output"
    router_dtype: Literal["float32", "model"] = "float32"
    sparsemixer_eps: float = 0.01

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, 1)
        check_int("top_k", self.top_k, 1, self.num_experts)
        check_choice("score_func", self.score_func, SCORE_FUNCS)
        check_float("sparsemixer_eps", self.sparsemixer_eps, 0.0)
        if self.score_func == "sparsemixer" and (self.n_group > 1 or self.selection_bias or self.normalize):
            fail("score_func", self.score_func, "sparsemixer without groups, selection bias or renormalisation")
        if self.softmax_after_topk and self.score_func != "softmax":
            fail("softmax_after_topk", self.softmax_after_topk, "True only with score_func='softmax'")
        check_int("n_group", self.n_group, 1, self.num_experts)
        if self.num_experts % self.n_group:
            fail("n_group", self.n_group, f"a divisor of num_experts={self.num_experts}")
        check_int("topk_group", self.topk_group, 1, self.n_group)
        check_choice("group_score", self.group_score, ("max", "top2_sum"))
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:
                fail("top_k", self.top_k, f"<= topk_group * experts per group = {self.topk_group * per_group}")
            if self.group_score == "top2_sum" and per_group < 2:
                fail("group_score", self.group_score, "'max' when a group holds a single expert")
        check_float("normalize_p", self.normalize_p, 0.0, lo_open=True)
        check_float("normalize_eps", self.normalize_eps, 0.0)
        check_float("scaling_factor", self.scaling_factor, 0.0, lo_open=True)
        check_choice("apply_to", self.apply_to, ("output", "input"))
        check_choice("router_dtype", self.router_dtype, ("float32", "model"))

    def describe(self) -> str:
        """The routing in words, for `moekit inspect` and the probe."""
        if self.softmax_after_topk:
            s = f"top-{self.top_k} of {self.num_experts} on raw logits, softmax over the {self.top_k}"
        elif self.score_func == "sparsemixer":
            s = f"sparsemixer top-{self.top_k} of {self.num_experts} (eps {self.sparsemixer_eps:g})"
        else:
            s = f"{self.score_func} scores, top-{self.top_k} of {self.num_experts}"
        if self.n_group > 1:
            how = "max" if self.group_score == "max" else "sum of top-2"
            s += f" within the best {self.topk_group} of {self.n_group} groups (group score: {how})"
        if self.selection_bias:
            s += ", selection bias (selection only)"
        if self.normalize:
            s += ", renormalised" if self.normalize_p == 1.0 else f", normalised by the {self.normalize_p}-norm"
        if self.scaling_factor != 1.0:
            s += f", x{self.scaling_factor:g}"
        if self.apply_to == "input":
            s += ", weights applied to the expert input"
        return s
