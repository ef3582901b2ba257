"""Plain-PyTorch sparse expert attention (MoA and SwitchHead): the truth for the tests of
:class:`kernel_moe.SparseExpertAttention`, written from the formulas with a loop over experts and
heads and an explicit softmax (no ``scaled_dot_product_attention``).

MoA: ``out(t) = sum_k g_k(t) * concat_j attn(q_j^{e_k}(t), K_j, V_j) @ w_o[e_k]^T + bias`` with
``q^{e}(t) = x_t @ w_q[e]^T``, shared keys/values ``[K | V] = x @ w_kv^T`` (h heads each), ``e_k``
the top-k router logits of token t and ``g`` the softmax over them.

SwitchHead: per head j, ``v_j(s) = sum_k gs_k(s) * x_s @ w_v[j*E + es_k]^T`` (sigmoid top-k of the
source gate), ``o_j(t) = attn(q_j(t), K_j, v_j)`` with dense ``q = x @ w_q^T``, ``k = x @ w_k^T``, and
``out(t) = sum_j sum_k gd_k(t) * o_j(t) @ w_o[j*E + ed_k]^T`` (sigmoid top-k of the destination gate).

Masks: key s is visible to query t when ``keep[s]`` (and ``s <= t`` when causal), or when s == t;
outputs at padded positions are 0. Legend: B batch, T sequence, D model width, E experts,
h heads, d head dim, F = h*d, M queries of one expert.
"""

from __future__ import annotations

import math

import torch


def visible(keep_BT: torch.Tensor | None, B: int, T: int, causal: bool) -> torch.Tensor:
    """[B, T(query), T(key)] bool: which keys each query may read."""
    ok = torch.ones(B, T, T, dtype=torch.bool)
    if keep_BT is not None:
        ok = ok & keep_BT.bool().cpu()[:, None, :]
    if causal:
        ok = ok & torch.ones(T, T, dtype=torch.bool).tril()
    return ok | torch.eye(T, dtype=torch.bool)


def attend(q_Md: torch.Tensor, k_MTd: torch.Tensor, v_MTd: torch.Tensor, ok_MT: torch.Tensor) -> torch.Tensor:
    """One head for M queries, each over its own sequence's keys: softmax(q k^T / sqrt(d)) v."""
    scores_MT = torch.einsum("md,mtd->mt", q_Md, k_MTd) / math.sqrt(q_Md.shape[-1])
    scores_MT = scores_MT.masked_fill(~ok_MT.to(scores_MT.device), float("-inf"))
    return torch.einsum("mt,mtd->md", torch.softmax(scores_MT, dim=-1), v_MTd)


def rotary(x_BThd: torch.Tensor, params: dict) -> torch.Tensor:
    """Rotate-half rotary embedding with params["cos"] / params["sin"] [B, T, d] (none: unchanged)."""
    if params.get("cos") is None:
        return x_BThd
    half = x_BThd.shape[-1] // 2
    rotated = torch.cat((-x_BThd[..., half:], x_BThd[..., :half]), dim=-1)
    return x_BThd * params["cos"][:, :, None] + rotated * params["sin"][:, :, None]


def naive_moa(x_BTD: torch.Tensor, params: dict, top_k: int, num_heads: int, causal: bool,
              keep_BT: torch.Tensor | None = None) -> torch.Tensor:
    """MoA by a loop over experts and heads. params: router [E, D], w_q [E, F, D], w_o [E, D, F],
    w_kv [2F, D], bias [D] | None, cos / sin (optional)."""
    B, T, D = x_BTD.shape
    w_q, w_o = params["w_q"], params["w_o"]
    E, Fh, _ = w_q.shape
    h, d = num_heads, Fh // num_heads
    logits_BTE = (x_BTD @ params["router"].t()).float()
    top_BTK, ids_BTK = logits_BTE.topk(top_k, dim=-1)
    gates_BTK = torch.softmax(top_BTK, dim=-1)
    kv = x_BTD @ params["w_kv"].t()
    k_BThd = rotary(kv[..., :Fh].reshape(B, T, h, d), params)
    v_BThd = kv[..., Fh:].reshape(B, T, h, d)
    ok_BTT = visible(keep_BT, B, T, causal)
    out_BTD = torch.zeros(B, T, D, dtype=x_BTD.dtype)
    for e in range(E):
        b, t, slot = torch.where(ids_BTK == e)
        if b.numel() == 0:
            continue
        q_Mhd = rotary((x_BTD[b, t] @ w_q[e].t()).reshape(-1, 1, h, d), {
            k: (None if params.get(k) is None else params[k][b, t].unsqueeze(1)) for k in ("cos", "sin")})[:, 0]
        heads = [attend(q_Mhd[:, j], k_BThd[b, :, j], v_BThd[b, :, j], ok_BTT[b, t]) for j in range(h)]
        y_MD = torch.cat(heads, dim=-1) @ w_o[e].t()
        out_BTD = out_BTD.index_put((b, t), y_MD * gates_BTK[b, t, slot, None].to(y_MD.dtype), accumulate=True)
    if params.get("bias") is not None:
        out_BTD = out_BTD + params["bias"]
    return out_BTD if keep_BT is None else out_BTD * keep_BT[..., None].to(out_BTD.dtype)


def _sigmoid_topk(logits_BThE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.sigmoid(logits_BThE.float())
    return scores.topk(top_k, dim=-1)


def naive_switchhead(x_BTD: torch.Tensor, params: dict, top_k: int, num_heads: int, causal: bool,
                     keep_BT: torch.Tensor | None = None) -> torch.Tensor:
    """SwitchHead by a loop over heads and experts. params: w_q, w_k [F, D], source / destination
    [h*E, D], w_v [h*E, d, D], w_o [h*E, D, d], bias [D] | None, cos / sin (optional)."""
    B, T, D = x_BTD.shape
    h = num_heads
    d = params["w_v"].shape[1]
    E = params["w_v"].shape[0] // h
    q_BThd = rotary((x_BTD @ params["w_q"].t()).reshape(B, T, h, d), params)
    k_BThd = rotary((x_BTD @ params["w_k"].t()).reshape(B, T, h, d), params)
    gs_BThK, es_BThK = _sigmoid_topk((x_BTD @ params["source"].t()).reshape(B, T, h, E), top_k)
    gd_BThK, ed_BThK = _sigmoid_topk((x_BTD @ params["destination"].t()).reshape(B, T, h, E), top_k)
    ok_BTT = visible(keep_BT, B, T, causal)
    out_BTD = torch.zeros(B, T, D, dtype=x_BTD.dtype)
    for j in range(h):
        v_BTd = torch.zeros(B, T, d, dtype=x_BTD.dtype)
        for e in range(E):
            b, t, slot = torch.where(es_BThK[:, :, j] == e)
            y = (x_BTD[b, t] @ params["w_v"][j * E + e].t()) * gs_BThK[b, t, j, slot, None].to(x_BTD.dtype)
            v_BTd = v_BTd.index_put((b, t), y, accumulate=True)
        bq, tq = torch.meshgrid(torch.arange(B), torch.arange(T), indexing="ij")
        bq, tq = bq.reshape(-1), tq.reshape(-1)
        o_Md = attend(q_BThd[bq, tq, j], k_BThd[bq, :, j], v_BTd[bq], ok_BTT[bq, tq])
        o_BTd = o_Md.reshape(B, T, d)
        for e in range(E):
            b, t, slot = torch.where(ed_BThK[:, :, j] == e)
            y = (o_BTd[b, t] @ params["w_o"][j * E + e].t()) * gd_BThK[b, t, j, slot, None].to(x_BTD.dtype)
            out_BTD = out_BTD.index_put((b, t), y, accumulate=True)
    if params.get("bias") is not None:
        out_BTD = out_BTD + params["bias"]
    return out_BTD if keep_BT is None else out_BTD * keep_BT[..., None].to(out_BTD.dtype)


__all__ = ["attend", "naive_moa", "naive_switchhead", "rotary", "visible"]
