"""The patch covariance of a stride-1 `Conv2D` from shifted products of its input, no patches.

K-FAC's input factor of a convolution sums `a_t a_t^T` over the unfolded patches `a_t`
(`in = k_h k_w C (+1)` wide, `T` positions): `T in^2` multiply-adds per example, 9x to 81x the
layer's forward pass. With stride 1 and dilation 1 the patch entries are shifts of one image
`x` `(H, W, C)`: the entry of offset `(u, v)` at output position `(i, j)` is
`x[i + u - top, j + v - left]` (zero outside the image; `top`, `left` the padding), so the
block of offsets `(u, v)`, `(u', v')` is

    B_uv,u'v' = sum_{r in R_u, s in S_v} x[r, s] x[r + du, s + dv]^T,   (du, dv) = (u' - u, v' - v),

with `R_u` the image rows that offset `u` reads (all rows but at most `k_h - 1`). By
inclusion-exclusion over the few rows `E_u` and columns `E_v` it misses,

    B = F(du, dv) - sum_{r in E_u} Row_r(du, dv) - sum_{s in E_v} Col_s(du, dv)
          + sum_{r in E_u, s in E_v} Point_rs(du, dv),

where `F(du, dv) = sum_{r, s} x[r, s] x[r + du, s + dv]^T` over the whole image and `Row`,
`Col`, `Point` are the same sums over one row, one column, one pixel. Blocks with
`(u', v') < (u, v)` are transposes, so only the `(2 k_w - 1)(k_h - 1) + k_w` shifts with
`(du, dv) >= (0, 0)` (13 of 81 block pairs for 3 x 3) are multiplied: `F` is one GEMM
`X^T [Y_delta ...]` over the batch, plus strips of one row or column. The bias entry (a
constant 1 input) gets the region sums of `x` the same way. Exact up to float32 round-off.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from vestigia.gradients.layer_kinds import LayerSpec


def applies(spec: LayerSpec) -> bool:
    """True for a `Conv2D` with stride 1, dilation 1, `same` / `valid` padding and a kernel wider than 1 x 1."""
    layer = spec.layer
    return (
        spec.kind == "conv"
        and layer.rank == 2
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.padding in ("same", "valid")
        and tuple(layer.kernel_size) != (1, 1)
    )


def _missed(size: int, kernel: int, padding: str) -> tuple[list[list[int]], int]:
    """Per kernel offset `u`, the image indices along one axis that it never reads (`E_u`), and
    the number of output positions along that axis."""
    before = (kernel - 1) // 2 if padding == "same" else 0
    outputs = size if padding == "same" else size - kernel + 1
    return [[r for r in range(size) if not u - before <= r < u - before + outputs] for u in range(kernel)], outputs


def patch_covariance(spec: LayerSpec, x: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, Any]:
    """`(sum_i sum_t a_it a_it^T, T)`: the summed patch covariance `(in, in)` of one call of the
    layer on `x` `(batch, H, W, C)`, each example's patches scaled by `scale` `(batch,)`, and the
    number of positions `T` (traced code; see the module docstring; requires `applies(spec)`)."""
    layer = spec.layer
    kh, kw = (int(k) for k in layer.kernel_size)
    x = tf.cast(x, tf.float32) * tf.cast(scale, tf.float32)[:, None, None, None]
    height, width, channels = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    missed_rows, out_h = _missed(height, kh, layer.padding)
    missed_cols, out_w = _missed(width, kw, layer.padding)
    shifts = [(du, dv) for du in range(kh) for dv in range(-(kw - 1), kw) if du > 0 or dv >= 0]
    index = {shift: k for k, shift in enumerate(shifts)}
    padded = tf.pad(x, [[0, 0], [0, kh - 1], [kw - 1, kw - 1], [0, 0]])
    shifted = tf.concat(
        [padded[:, du : du + height, kw - 1 + dv : kw - 1 + dv + width, :] for du, dv in shifts], axis=3
    )  # (batch, H, W, n_shifts * C): Y[r, s] = [x[r + du, s + dv] for each shift]

    def products(left: tf.Tensor, right: tf.Tensor) -> tf.Tensor:
        return tf.matmul(tf.reshape(left, [-1, channels]), tf.reshape(right, [-1, len(shifts) * channels]), True)

    full = products(x, shifted)
    rows = {r: products(x[:, r], shifted[:, r]) for r in sorted({r for e in missed_rows for r in e})}
    cols = {s: products(x[:, :, s], shifted[:, :, s]) for s in sorted({s for e in missed_cols for s in e})}
    points = {(r, s): products(x[:, r, s], shifted[:, r, s]) for r in rows for s in cols}
    # region sums of x (for the bias entry), weighted by the scale once more: a_t carries `scale`
    weighted = x * tf.cast(scale, tf.float32)[:, None, None, None]
    sum_full = tf.reduce_sum(weighted, axis=[0, 1, 2])
    sum_rows = {r: tf.reduce_sum(weighted[:, r], axis=[0, 1]) for r in rows}
    sum_cols = {s: tf.reduce_sum(weighted[:, :, s], axis=[0, 1]) for s in cols}
    sum_points = {(r, s): tf.reduce_sum(weighted[:, r, s], axis=0) for r, s in points}

    def region(parts: tuple[Any, dict, dict, dict], u: int, v: int, columns: slice) -> tf.Tensor:
        whole, by_row, by_col, by_point = parts
        total = whole[..., columns]
        for r in missed_rows[u]:
            total -= by_row[r][..., columns]
        for s in missed_cols[v]:
            total -= by_col[s][..., columns]
        for r in missed_rows[u]:
            for s in missed_cols[v]:
                total += by_point[(r, s)][..., columns]
        return total

    offsets = [(u, v) for u in range(kh) for v in range(kw)]
    blocks: dict[tuple[int, int], tf.Tensor] = {}
    for p, (u, v) in enumerate(offsets):
        for q in range(p, len(offsets)):
            k = index[(offsets[q][0] - u, offsets[q][1] - v)]
            blocks[(p, q)] = region((full, rows, cols, points), u, v, slice(k * channels, (k + 1) * channels))
    block_rows = [
        tf.concat([blocks[(p, q)] if q >= p else tf.transpose(blocks[(q, p)]) for q in range(len(offsets))], axis=1)
        for p in range(len(offsets))
    ]
    matrix = tf.concat(block_rows, axis=0)
    if spec.has_bias:
        sums = tf.concat(
            [region((sum_full, sum_rows, sum_cols, sum_points), u, v, slice(None)) for u, v in offsets], axis=0
        )
        corner = tf.reduce_sum(tf.square(tf.cast(scale, tf.float32))) * float(out_h * out_w)
        matrix = tf.concat(
            [tf.concat([matrix, sums[:, None]], axis=1), tf.concat([sums, corner[None]], axis=0)[None, :]], axis=0
        )
    return matrix, out_h * out_w
