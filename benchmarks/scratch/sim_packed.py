"""CPU simulation of gluon_psa's packed stages (producer order + consumer column decode)."""
import math, torch
import psa_kernels
from psa_kernels import LevelMap
from psa_kernels.pyramid import build_device_pyramid

KEYS = 128
def lev_of(x, e1, e2, e4):
    return (x >= e1).int() + (x >= e2).int() + (x >= e4).int()

def sim(q, k, v, layout, mask=None, causal=True):
    B, Hq, Lq, D = q.shape; Hkv, Lk = k.shape[1], k.shape[2]
    pyr = build_device_pyramid(k, v, mask)
    total = pyr.keys.shape[2]
    K1, V1 = k.reshape(-1, D), v.reshape(-1, D)
    KP, VP = pyr.keys.reshape(-1, D), pyr.values.reshape(-1, D)
    b2, b4, b8 = pyr.base[2], pyr.base[4], pyr.base[8]
    pcnt, plast = pyr.counts.reshape(-1), pyr.last.reshape(-1)
    pad = mask.to(torch.int8).reshape(-1) if mask is not None else None
    Hm, nq, nk = layout.indices.shape[1:]
    out = torch.zeros_like(q, dtype=torch.float32)
    scale = D ** -0.5
    for b in range(B):
        for h in range(Hq):
            hm = h // (Hq // Hm); bk = b * Hkv + h // (Hq // Hkv)
            for qb in range(nq):
                idx = layout.indices[b, hm, qb].long(); lc = layout.counts[b, hm, qb].tolist(); pl = layout.plan[b, hm, qb].tolist()
                n = pl[:4]; w = pl[4:]; o = [0, lc[0], lc[0] + lc[1], lc[0] + lc[1] + lc[2]]
                rows0 = [bk * Lk, bk * total + b2, bk * total + b4, bk * total + b8]
                # producer
                stage_rows = []  # list of (src, row)
                def run(first, cnts):
                    rows = []
                    for li in range(4):
                        P = 1 << li; kpb = KEYS // P
                        for j in range(cnts[li]):
                            blk = int(idx[o[li] + first[li] + j])
                            for r in range(kpb):
                                rows.append((li, rows0[li] + blk * kpb + r))
                    while len(rows) % KEYS:
                        rows.append((3, rows0[3] + (len(rows) % KEYS) % 16))  # fill (any real rows)
                    return rows
                ra = run([0] * 4, w); rb = run(w, [n[i] - w[i] for i in range(4)])
                rows = ra + rb
                if not rows:
                    continue
                def get(T, r):
                    return T[r] if r < T.shape[0] else torch.zeros(D)
                Ks = torch.stack([get(K1, r) if li == 0 else get(KP, r) for li, r in rows]).float()
                Vs = torch.stack([get(V1, r) if li == 0 else get(VP, r) for li, r in rows]).float()
                # consumer decode
                a1 = w[0] * 128; a2 = a1 + w[1] * 64; a4 = a2 + w[2] * 32; rows_a = a4 + w[3] * 16
                e1 = (n[0] - w[0]) * 128; e2 = e1 + (n[1] - w[1]) * 64; e4 = e2 + (n[2] - w[2]) * 32
                rows_b = e4 + (n[3] - w[3]) * 16
                sa = math.ceil(rows_a / 128)
                bias, last = [], []
                for t in range(len(rows) // KEYS):
                    x0 = t * KEYS
                    if t < sa:
                        x = x0 + torch.arange(KEYS)
                        bb = torch.where(x < rows_a, lev_of(x, a1, a2, a4).float(), float("-inf"))
                        bias.append(bb); last.append(torch.full((KEYS,), -1))
                    else:
                        x = x0 - sa * KEYS + torch.arange(KEYS)
                        lev = lev_of(x, e1, e2, e4)
                        start = torch.where(lev == 0, 0, torch.where(lev == 1, e1, torch.where(lev == 2, e2, e4)))
                        shift = 7 - lev
                        first = torch.where(lev == 0, w[0], torch.where(lev == 1, o[1] + w[1], torch.where(lev == 2, o[2] + w[2], o[3] + w[3])))
                        ok = x < rows_b
                        ent = (first + ((x - start) >> shift)).clamp(0, nk - 1)
                        blk = torch.where(ok, idx[ent], 0).int()
                        key = (blk << shift) + ((x - start) & ((1 << shift) - 1))
                        ok = ok & (key < ((Lk + (1 << lev) - 1) >> lev))
                        pooled = lev > 0
                        at = (torch.where(lev == 1, b2, torch.where(lev == 2, b4, b8)) + b * total + key).clamp(0, pcnt.numel() - 1)
                        cnt = torch.where(ok & pooled, pcnt[at], 1)
                        ls = torch.where(pooled, torch.where(ok & pooled, plast[at], 0), key)
                        ok = ok & (cnt > 0)
                        if pad is not None:
                            pk = (b * Lk + key).clamp(0, pad.numel() - 1)
                            ok = ok & (pooled | (torch.where(ok & (lev == 0), pad[pk], 0) != 0))
                        bias.append(torch.where(ok, torch.log2(cnt.clamp(min=1).float()), float("-inf"))); last.append(ls)
                bias = torch.cat(bias); last = torch.cat(last)
                r = torch.arange(qb * 128, min(qb * 128 + 128, Lq))
                logits = q[b, h, r].float() @ Ks.T * scale * 1.4426950408889634 + bias[None]
                if causal:
                    logits = torch.where(last[None] < (r + Lk - Lq + 1)[:, None], logits, float("-inf"))
                m = logits.max(1, keepdim=True).values
                m = torch.where(m == float("-inf"), 0.0, m)
                p = torch.exp2(logits - m)
                l = p.sum(1, keepdim=True)
                out[b, h, r] = torch.where(l > 0, (p @ Vs) / l.clamp(min=1e-30), 0.0)
    return out

torch.manual_seed(0)
levels = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
for B, Hq, Hkv, Lq, Lk, D, padn in [(1, 4, 2, 700, 700, 32, 0), (2, 2, 1, 600, 600, 16, 300), (1, 2, 1, 200, 900, 16, 0), (1, 2, 2, 130, 130, 16, 0)]:
    q = torch.randn(B, Hq, Lq, D); k = torch.randn(B, Hkv, Lk, D); v = torch.randn(B, Hkv, Lk, D)
    mask = None
    if padn:
        mask = torch.ones(B, Lk, dtype=torch.bool); mask[1, :padn] = False
    nq, nk = -(-Lq // 128), -(-Lk // 128)
    dense = levels[torch.randint(0, 5, (B, Hq, nq, nk))]; dense[..., 0] = 1
    layout = LevelMap.from_dense(dense, block_q=128, block_k=128, q_len=Lq, k_len=Lk, causal=True, key_padding_mask=mask)
    want = psa_kernels.psa_attention(q, k, v, layout, causal=True, key_padding_mask=mask).float()
    got = sim(q, k, v, layout, mask)
    err = ((got - want).norm() / want.norm()).item()
    print(B, Hq, Hkv, Lq, Lk, D, padn, f"rel err {err:.2e}", "nan", bool(got.isnan().any()))
