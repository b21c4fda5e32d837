"""Vision attention: each mechanism against dense attention on the flattened grid, the
masks against independent constructions (NATTEN's per-group windows written with lists,
NATTEN's CPU window-start formula, Swin's literal roll / partition / img_mask in torch),
NATTEN's defining properties, CLS tokens, pictures, and the errors."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import refattn as ra
from refattn.testing import max_rel_error
import refattn.vision as vision
from refattn.masks import EMPTY, FULL, Mask
from refattn.vision import (draw_query_pixel, neighborhood_attention, neighborhood_mask,
                            patch_merging, shifted_window_attention, shifted_window_mask,
                            spatial_reduction_attention, window_attention, window_mask,
                            with_global)


def _flat(x, nd):
    """(..., H, *S, C) -> (..., H, prod(S), C), row-major."""
    return x.reshape(x.shape[:-nd - 1] + (-1, x.shape[-1]))


@st.composite
def grid_problems(draw, nd=None, max_side=None):
    """Grid inputs with GQA and batch dims: (q, k, v, shape)."""
    nd = draw(st.integers(1, 3)) if nd is None else nd
    side = max_side or {1: 30, 2: 9, 3: 5}[nd]
    shape = tuple(draw(st.lists(st.integers(1, side), min_size=nd, max_size=nd)))
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=1)))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    d = draw(st.integers(1, 6))
    dv = draw(st.sampled_from([d, 3]))
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.standard_normal(batch + (hq,) + shape + (d,)) * spread
    k = rng.standard_normal(batch + (hkv,) + shape + (d,)) * spread
    v = rng.standard_normal(batch + (hkv,) + shape + (dv,))
    return q, k, v, shape


# ------------------------------------------------------------ NATTEN, independently
def natten_axis(length, kernel, dilation, causal):
    """keep[x, u] on one axis, straight from the definition: the query's dilation group
    as a list, a window of `kernel` members around it, shifted inwards at the ends."""
    keep = np.zeros((length, length), bool)
    for x in range(length):
        members = list(range(x % dilation, length, dilation))
        i = members.index(x)
        if causal:
            chosen = members[max(0, i - kernel + 1):i + 1]
        else:
            start = min(max(i - kernel // 2, 0), len(members) - kernel)
            chosen = members[start:start + kernel]
        keep[x, chosen] = True
    return keep


def natten_cpu_window_start(index, length, kernel, dilation):
    """NATTEN's CPU kernel formula (get_window_start, odd kernels)."""
    ns = kernel // 2
    if dilation <= 1:
        return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
    if index - ns * dilation < 0:
        return index % dilation
    if index + ns * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * ns * dilation
        return a + imodd - kernel * dilation
    return index - ns * dilation


def product_keep(shape, per_axis):
    coords = np.indices(shape).reshape(len(shape), -1)
    n = coords.shape[1]
    keep = np.ones((n, n), bool)
    for axis, table in enumerate(per_axis):
        keep &= table[coords[axis][:, None], coords[axis][None, :]]
    return keep


@st.composite
def na_params(draw, shape):
    kernel, dil, causal = [], [], []
    for length in shape:
        kk = draw(st.integers(1, length))
        kernel.append(kk)
        dil.append(draw(st.integers(1, length // kk)))
        causal.append(draw(st.booleans()))
    return tuple(kernel), tuple(dil), tuple(causal)


@given(data=st.data(), nd=st.integers(1, 3))
def test_neighborhood_mask_is_natten_definition(data, nd):
    shape = tuple(data.draw(st.lists(st.integers(1, {1: 40, 2: 9, 3: 5}[nd]),
                                     min_size=nd, max_size=nd)))
    kernel, dil, causal = data.draw(na_params(shape))
    mask = neighborhood_mask(shape, kernel, dil, causal)
    n = math.prod(shape)
    expected = product_keep(shape, [natten_axis(*a) for a in zip(shape, kernel, dil, causal)])
    np.testing.assert_array_equal(mask.materialize(n, n), expected)


def test_per_group_windows_match_natten_cpu_formula():
    for length in range(1, 30):
        for kernel in range(1, length + 1, 2):
            for dil in range(1, length // kernel + 1):
                expected = np.zeros((length, length), bool)
                for x in range(length):
                    start = natten_cpu_window_start(x, length, kernel, dil)
                    expected[x, start:start + kernel * dil:dil] = True
                got = neighborhood_mask((length,), (kernel,), dil).materialize(length, length)
                np.testing.assert_array_equal(got, expected, err_msg=f"{length, kernel, dil}")


@given(data=st.data(), nd=st.integers(1, 3))
def test_every_query_sees_exactly_k_to_the_d_keys(data, nd):
    shape = tuple(data.draw(st.lists(st.integers(1, {1: 40, 2: 10, 3: 6}[nd]),
                                     min_size=nd, max_size=nd)))
    kernel, dil, _ = data.draw(na_params(shape))
    n = math.prod(shape)
    counts = neighborhood_mask(shape, kernel, dil).materialize(n, n).sum(1)
    assert (counts == math.prod(kernel)).all()        # borders included
    # causal: prod over axes of min(group index + 1, k)
    causal = neighborhood_mask(shape, kernel, dil, True).materialize(n, n).sum(1)
    coords = np.indices(shape).reshape(nd, -1)
    expected = np.prod([np.minimum(coords[a] // dil[a] + 1, kernel[a]) for a in range(nd)],
                       axis=0)
    np.testing.assert_array_equal(causal, expected)


def test_interior_windows_are_centered_and_borders_shift_inwards():
    keep = neighborhood_mask((9, 9), (3, 5)).materialize(81, 81)
    row = keep[4 * 9 + 4].reshape(9, 9)
    np.testing.assert_array_equal(np.argwhere(row).min(0), [3, 2])
    np.testing.assert_array_equal(np.argwhere(row).max(0), [5, 6])
    corner = keep[0].reshape(9, 9)                       # clamped: still 3 x 5, inwards
    np.testing.assert_array_equal(np.argwhere(corner).max(0), [2, 4])
    assert corner.sum() == 15
    even = neighborhood_mask((8,), (4,)).materialize(8, 8)[4]    # k/2 before, k/2-1 after
    np.testing.assert_array_equal(np.flatnonzero(even), [2, 3, 4, 5])


@given(problem=grid_problems(), data=st.data(),
       method=st.sampled_from(["auto", "tiles", "gather"]), block=st.integers(1, 40))
def test_neighborhood_attention_equals_dense_under_its_mask(problem, data, method, block):
    q, k, v, shape = problem
    kernel, dil, causal = data.draw(na_params(shape))
    nd = len(shape)
    out, lse = neighborhood_attention(q, k, v, kernel, dilation=dil, causal=causal,
                                      method=method, block_q=block, block_k=block + 3,
                                      return_lse=True)
    ref, ref_lse = ra.attention(_flat(q, nd), _flat(k, nd), _flat(v, nd), return_lse=True,
                                mask=neighborhood_mask(shape, kernel, dil, causal))
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and lse.shape == q.shape[:-1]
    assert max_rel_error(_flat(out, nd), ref) <= 1e-12
    assert max_rel_error(lse.reshape(ref_lse.shape), ref_lse) <= 1e-12


@given(problem=grid_problems())
def test_kernel_equal_to_the_image_is_full_attention(problem):
    q, k, v, shape = problem
    nd = len(shape)
    out = neighborhood_attention(q, k, v, shape)
    ref = ra.attention(_flat(q, nd), _flat(k, nd), _flat(v, nd))
    assert max_rel_error(_flat(out, nd), ref) <= 1e-12


def test_kernel_times_dilation_equal_to_the_image_is_attention_within_dilation_groups(rng):
    q, k, v = rng.standard_normal((3, 2, 6, 9, 4))
    out = neighborhood_attention(q, k, v, (3, 3), dilation=(2, 3))
    for gx in range(2):
        for gy in range(3):
            sub = [x[:, gx::2, gy::3].reshape(2, -1, 4) for x in (q, k, v)]
            ref = ra.attention(*sub)
            assert max_rel_error(out[:, gx::2, gy::3].reshape(2, -1, 4), ref) <= 1e-12


def test_natten_corner_query_by_hand(rng):
    q, k, v = rng.standard_normal((3, 1, 10, 8, 5))
    out = neighborhood_attention(q, k, v, (5, 3), dilation=(2, 1))
    # query (9, 7): group 1 on axis 0 = rows 1, 3, 5, 7, 9 (last 5); columns 5, 6, 7
    rows, cols = np.array([1, 3, 5, 7, 9]), np.array([5, 6, 7])
    keys = k[0][np.ix_(rows, cols)].reshape(15, 5)
    vals = v[0][np.ix_(rows, cols)].reshape(15, 5)
    s = keys @ q[0, 9, 7] / np.sqrt(5)
    w = np.exp(s - s.max())
    np.testing.assert_allclose(out[0, 9, 7], w @ vals / w.sum(), rtol=1e-13)


# ----------------------------------------------------------------- windows and Swin
def swin_keep(shape, window, shift):
    """Swin's pairs, built as its code builds them: pad, roll the token indices by
    -shift, cut windows, label regions with img_mask's slices, keep equal labels
    (padded tokens dropped)."""
    nd = len(shape)
    padded = tuple(-(-s // w) * w for s, w in zip(shape, window))
    idx = np.full(padded, -1)
    idx[tuple(slice(0, s) for s in shape)] = np.arange(math.prod(shape)).reshape(shape)
    rolled = np.roll(idx, tuple(-s for s in shift), axis=tuple(range(nd)))
    img_mask = np.zeros(padded, int)
    slices = [((slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(0, None),))
              for w, s in zip(window, shift)]
    cnt = 0
    for combo in np.ndindex(*[len(sl) for sl in slices]):
        img_mask[tuple(slices[a][c] for a, c in enumerate(combo))] = cnt
        cnt += 1
    n = math.prod(shape)
    keep = np.zeros((n, n), bool)
    for start in np.ndindex(*[p // w for p, w in zip(padded, window)]):
        box = tuple(slice(b * w, (b + 1) * w) for b, w in zip(start, window))
        ids, labs = rolled[box].ravel(), img_mask[box].ravel()
        ok = ids >= 0
        same = (labs[:, None] == labs[None, :]) & ok[:, None] & ok[None, :]
        a, b = np.nonzero(same)
        keep[ids[a], ids[b]] = True
    return keep


@st.composite
def window_params(draw, shape):
    window = tuple(draw(st.integers(1, s)) for s in shape)
    shift = tuple(draw(st.integers(0, w - 1)) for w in window)
    return window, shift


@given(data=st.data(), nd=st.integers(1, 3))
def test_window_mask_is_swins_rolled_windows(data, nd):
    shape = tuple(data.draw(st.lists(st.integers(1, {1: 30, 2: 11, 3: 6}[nd]),
                                     min_size=nd, max_size=nd)))
    window, shift = data.draw(window_params(shape))
    n = math.prod(shape)
    np.testing.assert_array_equal(window_mask(shape, window, shift).materialize(n, n),
                                  swin_keep(shape, window, shift))


@given(problem=grid_problems(), data=st.data(),
       method=st.sampled_from(["auto", "tiles", "gather"]), block=st.integers(1, 40))
def test_window_attention_equals_dense_under_its_mask_and_swins_literal_form(
        problem, data, method, block):
    q, k, v, shape = problem
    window, shift = data.draw(window_params(shape))
    nd = len(shape)
    out, lse = window_attention(q, k, v, window, shift=shift, method=method, block_q=block,
                                block_k=block + 1, return_lse=True)
    ref, ref_lse = ra.attention(_flat(q, nd), _flat(k, nd), _flat(v, nd), return_lse=True,
                                mask=window_mask(shape, window, shift))
    assert max_rel_error(_flat(out, nd), ref) <= 1e-12
    assert max_rel_error(lse.reshape(ref_lse.shape), ref_lse) <= 1e-12
    literal, literal_lse = shifted_window_attention(q, k, v, window, shift=shift,
                                                    return_lse=True)
    assert max_rel_error(literal, out) <= 1e-12 and max_rel_error(literal_lse, lse) <= 1e-12


def test_shifted_window_attention_defaults_to_half_a_window(rng):
    q, k, v = rng.standard_normal((3, 2, 11, 13, 4))
    a = shifted_window_attention(q, k, v, (4, 6))
    b = window_attention(q, k, v, (4, 6), shift=(2, 3))
    assert max_rel_error(a, b) <= 1e-12
    assert max_rel_error(a, window_attention(q, k, v, (4, 6))) > 1e-3     # the shift matters
    assert repr(shifted_window_mask((11, 13), (4, 6))) == \
        "window_mask((11, 13), window=(4, 6), shift=(2, 3))"


def test_window_attention_is_attention_per_window(rng):
    q, k, v = rng.standard_normal((3, 3, 8, 12, 4))
    out = window_attention(q, k, v, (4, 3))
    for i in range(2):
        for j in range(4):
            box = (slice(None), slice(4 * i, 4 * i + 4), slice(3 * j, 3 * j + 3))
            ref = ra.attention(*(x[box].reshape(3, 12, 4) for x in (q, k, v)))
            assert max_rel_error(out[box].reshape(3, 12, 4), ref) <= 1e-12


def test_swin_shifted_windows_in_torch_match(rng):
    """Swin's SW-MSA written with torch ops the way its code does (roll, window_partition,
    img_mask, masked softmax, window_reverse, roll back), in float64."""
    torch = pytest.importorskip("torch")

    def partition(x, w):                      # (B, H, W, C) -> (nW*B, w*w, C)
        b, h, ww, c = x.shape
        x = x.view(b, h // w, w, ww // w, w, c)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w * w, c)

    def reverse(x, w, h, ww):
        b = x.shape[0] // (h * ww // w // w)
        x = x.view(b, h // w, ww // w, w, w, -1)
        return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, ww, -1)

    height, width, w, s, d = 12, 8, 4, 2, 6
    q, k, v = (torch.from_numpy(x) for x in rng.standard_normal((3, 1, height, width, d)))
    img_mask = torch.zeros((1, height, width, 1), dtype=torch.float64)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    mask_windows = partition(img_mask, w).squeeze(-1)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0 * 1e300)).masked_fill(
        attn_mask == 0, 0.0)
    qs, ks, vs = (partition(torch.roll(x, shifts=(-s, -s), dims=(1, 2)), w)
                  for x in (q, k, v))
    logits = qs @ ks.transpose(-2, -1) * d ** -0.5 + attn_mask
    out = reverse(torch.softmax(logits, -1) @ vs, w, height, width)
    out = torch.roll(out, shifts=(s, s), dims=(1, 2)).numpy()
    mine = window_attention(q.numpy()[:, None], k.numpy()[:, None], v.numpy()[:, None], w,
                            shift=s)[:, 0]
    assert max_rel_error(mine, out) <= 1e-12


# -------------------------------------------------------------- spatial reduction
def pool_by_loops(x, ratio):
    """Average pooling of the (X, Y) axes of x (..., X, Y, C), ceil mode, loops."""
    xs, ys = x.shape[-3:-1]
    out = np.zeros(x.shape[:-3] + (-(-xs // ratio[0]), -(-ys // ratio[1]), x.shape[-1]))
    for i in range(out.shape[-3]):
        for j in range(out.shape[-2]):
            block = x[..., i * ratio[0]:(i + 1) * ratio[0], j * ratio[1]:(j + 1) * ratio[1], :]
            out[..., i, j, :] = block.reshape(block.shape[:-3] + (-1, x.shape[-1])).mean(-2)
    return out


@given(problem=grid_problems(nd=2), data=st.data())
def test_spatial_reduction_equals_attention_to_pooled_keys(problem, data):
    q, k, v, shape = problem
    ratio = (data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10)))
    kshape = (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)))   # other grid
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    k = rng.standard_normal(k.shape[:-3] + kshape + k.shape[-1:])
    v = rng.standard_normal(v.shape[:-3] + kshape + v.shape[-1:])
    out = spatial_reduction_attention(q, k, v, ratio)
    ref = ra.attention(_flat(q, 2), _flat(pool_by_loops(k, ratio), 2),
                       _flat(pool_by_loops(v, ratio), 2))
    assert max_rel_error(_flat(out, 2), ref) <= 1e-12
    spec = ra.mechanisms()["spatial_reduction_attention"]
    implied = spec.implied_matrix(q, k, ratio=ratio)
    assert implied.shape[-2:] == (math.prod(shape), math.prod(kshape))
    np.testing.assert_allclose(implied.sum(-1), 1.0, rtol=1e-12)
    group = q.shape[-4] // k.shape[-4]
    assert max_rel_error(implied @ np.repeat(_flat(v, 2), group, axis=-3), _flat(out, 2)) <= 1e-12


def test_spatial_reduction_limits(rng):
    q, k, v = rng.standard_normal((3, 2, 7, 5, 4))
    full = spatial_reduction_attention(q, k, v, 1)
    assert max_rel_error(_flat(full, 2), ra.attention(*(_flat(x, 2) for x in (q, k, v)))) <= 1e-12
    one = spatial_reduction_attention(q, k, v, (7, 9))     # one pooled key: its value
    np.testing.assert_allclose(one, np.broadcast_to(v.mean((1, 2))[:, None, None],
                                                    one.shape), rtol=1e-13)


# ---------------------------------------------------------------------- CLS tokens
@st.composite
def cls_problems(draw):
    q, k, v, shape = draw(grid_problems(nd=2))
    g = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 99)))
    cls = (rng.standard_normal(q.shape[:-3] + (g, q.shape[-1])),
           rng.standard_normal(k.shape[:-3] + (g, k.shape[-1])),
           rng.standard_normal(v.shape[:-3] + (g, v.shape[-1])))
    return q, k, v, shape, cls


def _with_cls(x, c):
    flat = _flat(x, 2)
    batch = np.broadcast_shapes(flat.shape[:-3], c.shape[:-3])
    return np.concatenate([np.broadcast_to(c, batch + c.shape[-3:]),
                           np.broadcast_to(flat, batch + flat.shape[-3:])], axis=-2)


@given(problem=cls_problems(), data=st.data(),
       method=st.sampled_from(["tiles", "gather"]), block=st.integers(1, 30))
def test_cls_tokens_attend_everywhere_and_are_attended_by_all(problem, data, method, block):
    q, k, v, shape, cls = problem
    g = cls[0].shape[-2]
    qs, ks, vs = (_with_cls(x, c) for x, c in zip((q, k, v), cls))
    kernel, dil, causal = data.draw(na_params(shape))
    window, shift = data.draw(window_params(shape))
    opts = dict(method=method, block_q=block, block_k=block + 2)
    cases = [
        (neighborhood_attention(q, k, v, kernel, dilation=dil, causal=causal,
                                cls_tokens=cls, return_lse=True, **opts),
         with_global(neighborhood_mask(shape, kernel, dil, causal), g)),
        (window_attention(q, k, v, window, shift=shift, cls_tokens=cls, return_lse=True,
                          **opts), with_global(window_mask(shape, window, shift), g)),
        (shifted_window_attention(q, k, v, window, shift=shift, cls_tokens=cls,
                                  return_lse=True),
         with_global(window_mask(shape, window, shift), g)),
    ]
    for (out, lse, out_cls, lse_cls), mask in cases:
        ref, ref_lse = ra.attention(qs, ks, vs, mask=mask, return_lse=True)
        assert max_rel_error(out_cls, ref[..., :g, :]) <= 1e-12
        assert max_rel_error(_flat(out, 2), ref[..., g:, :]) <= 1e-12
        assert max_rel_error(lse_cls, ref_lse[..., :g]) <= 1e-12
        assert max_rel_error(lse.reshape(ref_lse[..., g:].shape), ref_lse[..., g:]) <= 1e-12
    ratio = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    out, out_cls = spatial_reduction_attention(q, k, v, ratio, cls_tokens=cls)
    kp = _with_cls(pool_by_loops(k, ratio), cls[1])
    vp = _with_cls(pool_by_loops(v, ratio), cls[2])
    ref = ra.attention(qs, kp, vp)
    assert max_rel_error(out_cls, ref[..., :g, :]) <= 1e-12 and max_rel_error(_flat(out, 2), ref[..., g:, :]) <= 1e-12


# ------------------------------------------------------------------ tile classification
@given(data=st.data(), nd=st.integers(1, 3), bq=st.integers(1, 20), bk=st.integers(1, 20),
       g=st.integers(0, 3))
def test_tile_classification_is_conservative(data, nd, bq, bk, g):
    shape = tuple(data.draw(st.lists(st.integers(1, {1: 40, 2: 9, 3: 5}[nd]),
                                     min_size=nd, max_size=nd)))
    kernel, dil, causal = data.draw(na_params(shape))
    window, shift = data.draw(window_params(shape))
    n = math.prod(shape) + g
    for mask in (with_global(neighborhood_mask(shape, kernel, dil, causal), g),
                 with_global(window_mask(shape, window, shift), g)):
        labels = mask.classify_tiles(n, n, bq, bk)
        truth = Mask._classify(mask, ra.masks.Tiles.grid(n, n, bq, bk))   # by evaluation
        assert ((labels != EMPTY) | (truth == EMPTY)).all(), mask
        assert ((labels != FULL) | (truth == FULL)).all(), mask


def test_visited_tiles_grow_linearly_with_the_grid():
    for side in (32, 64, 128):
        n = side * side
        mask = neighborhood_mask((side, side), (7, 7))
        indptr, _, _ = mask.tile_lists(n, n, side, side)          # one image row a tile
        assert indptr[-1] == 7 * side       # clamped windows: always 7 rows of keys
    full = neighborhood_mask((8, 8), (8, 8)).classify_tiles(64, 64, 8, 8)
    assert (full == FULL).all()
    win = window_mask((8, 8), (4, 4)).classify_tiles(64, 64, 4, 4)
    # tiles of half a row: 4 full key tiles per query tile, nothing partial
    assert (win == FULL).sum() == 64 and (win == EMPTY).sum() == 256 - 64


# ------------------------------------------------------------------- patch merging
def test_patch_merging_by_loops_and_swin_order(rng):
    x = rng.standard_normal((2, 5, 7, 3))
    out = patch_merging(x)
    assert out.shape == (2, 3, 4, 12)
    padded = np.zeros((2, 6, 8, 3))
    padded[:, :5, :7] = x
    for i in range(3):
        for j in range(4):
            expect = np.concatenate([padded[:, 2 * i + di, 2 * j + dj]
                                     for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1))], -1)
            np.testing.assert_array_equal(out[:, i, j], expect)
    even = rng.standard_normal((4, 6, 5))                 # even sides: a permutation
    np.testing.assert_array_equal(np.sort(patch_merging(even).ravel()), np.sort(even.ravel()))
    # a stage: window attention, merge, window attention on the quarter-size grid
    q = rng.standard_normal((1, 8, 8, 4))
    stage2 = window_attention(*(patch_merging(x) for x in (q, q, q)), 2)
    assert stage2.shape == (1, 4, 4, 16)


# --------------------------------------------------------------------------- pictures
PATTERNS = [
    ("neighborhood_attention", (9, 11), (0, 10), dict(kernel_size=(5, 3))),
    ("neighborhood_attention", (12, 10), (11, 4), dict(kernel_size=(3, 3), dilation=(2, 3))),
    ("neighborhood_attention", (9, 9), (6, 6), dict(kernel_size=(3, 5), causal=(True, False))),
    ("neighborhood_attention", (20,), (19,), dict(kernel_size=(5,), dilation=3)),
    ("neighborhood_attention", (3, 5, 6), (1, 4, 0), dict(kernel_size=(3, 3, 3))),
    ("window_attention", (10, 9), (9, 8), dict(window=(4, 4))),
    ("shifted_window_attention", (10, 9), (0, 0), dict(window=(4, 4))),
    ("window_attention", (10, 9), (5, 2), dict(window=(4, 3), shift=(1, 2), num_global=3)),
]


def _cells(img, cell):
    return img[cell // 2::cell, cell // 2::cell, :3]


@pytest.mark.parametrize("name, shape, pixel, params", PATTERNS)
def test_query_pixel_picture_shows_the_mask_row(tmp_path, name, shape, pixel, params):
    import matplotlib.image
    path = tmp_path / "q.png"
    draw_query_pixel(name, shape, pixel, path, raw=True, cell=5, **params)
    img = matplotlib.image.imread(path)
    assert img.dtype == np.float32 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = np.round(_cells(img, 5) * 255).astype(int)
    g = params.pop("num_global", 0)
    mask = with_global(getattr(vision, name).mask(shape, **params), g)
    n = math.prod(shape) + g
    row = mask.materialize(n, n)[g + np.ravel_multi_index(pixel, shape)]
    white = (cells == 255).all(-1)
    grey = (cells == 200).all(-1)
    if g:
        width = cells.shape[1]
        strip_rows = -(-g // width)
        np.testing.assert_array_equal(~white[:strip_rows].ravel()[:g], row[:g])
        assert grey[strip_rows].all()
        cells, white, grey = (a[strip_rows + 1:] for a in (cells, white, grey))
    if len(shape) == 3:        # slices side by side, one grey column between them
        assert grey[:, shape[2]::shape[2] + 1].all()
        white = np.concatenate([white[:, t * (shape[2] + 1):t * (shape[2] + 1) + shape[2]]
                                for t in range(shape[0])], axis=0).reshape(shape)
    np.testing.assert_array_equal(~white.reshape(-1), row[g:])
    red = (cells == (214, 39, 40)).all(-1)
    assert red.sum() == 1
    fig_path = tmp_path / "annotated.png"
    fig = draw_query_pixel(name, shape, pixel, fig_path, **params, num_global=g)
    assert fig_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"sees {int(row[g:].sum())} of {math.prod(shape)}" in fig.axes[0].get_title()


def test_pictures_of_spatial_reduction_and_plain_masks(tmp_path):
    img = draw_query_pixel("spatial_reduction_attention", (6, 4), (2, 1), raw=True,
                           cell=1, ratio=(2, 3))
    assert not (img == 255).all(-1).any()                 # every key feeds a pooled key
    alt = (img == (86, 126, 186)).all(-1)
    np.testing.assert_array_equal(alt[:, 3], [True, True, False, False, True, True])
    # any FlexAttention-style mask_mod over the flattened grid
    img = draw_query_pixel(lambda b, h, i, j: (i + j) % 5 == 0, (4, 5), (1, 1), raw=True,
                           cell=1)
    pink = (img == (244, 163, 163)).all(-1)              # the query, which it ignores
    assert pink[1, 1] and pink.sum() == 1
    keep = ~(img == 255).all(-1) & ~pink
    np.testing.assert_array_equal(keep.ravel(), (6 + np.arange(20)) % 5 == 0)
    with pytest.raises(ValueError, match="unknown vision mechanism"):
        draw_query_pixel("nope", (4, 4), (0, 0))
    with pytest.raises(ValueError, match="pixel must be 2 integer coordinates"):
        draw_query_pixel("window_attention", (4, 4), (4, 0), window=2)


# ---------------------------------------------------------------------------- errors
def test_clear_errors(rng):
    q = rng.standard_normal((1, 8, 6, 4))
    with pytest.raises(ValueError, match=r"kernel_size \(9, 3\) is larger than the grid "
                                         r"\(8, 6\) on axis 0"):
        neighborhood_attention(q, q, q, (9, 3))
    with pytest.raises(ValueError, match=r"kernel_size \* dilation = 3 \* 3 = 9 exceeds the "
                                         r"grid \(8, 6\) on axis 0"):
        neighborhood_attention(q, q, q, (3, 3), dilation=3)
    with pytest.raises(ValueError, match=r"window \(4, 7\) does not fit the grid \(8, 6\)"):
        window_attention(q, q, q, (4, 7))
    with pytest.raises(ValueError, match=r"window \(4, 7\) does not fit"):
        shifted_window_attention(q, q, q, (4, 7))
    with pytest.raises(ValueError, match="shift .* must be smaller than the window"):
        window_attention(q, q, q, 4, shift=4)
    with pytest.raises(ValueError, match="kernel_size must be an int or 2 entries|dilation"):
        neighborhood_attention(q, q, q, (3, 3), dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        neighborhood_attention(q, q, q, (0, 3))
    with pytest.raises(ValueError, match="causal must be True, False or one of"):
        neighborhood_attention(q, q, q, (3, 3), causal="yes")
    with pytest.raises(ValueError, match=r"q and k must share the last dimension D; got "
                                         r"q \(1, 8, 6, 4\), k \(1, 8, 6, 3\)"):
        neighborhood_attention(q, q[..., :3], q, (3, 3))
    with pytest.raises(ValueError, match=r"same grid; got q grid \(8, 6\), k grid \(8, 5\)"):
        window_attention(q, q[:, :, :5], q[:, :, :5], 2)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., heads, T, X, Y, dim\)"):
        neighborhood_attention(q, q, q, (3, 3, 3))
    with pytest.raises(ValueError, match="covers a grid of 48 tokens; it was used with N=40"):
        ra.attention(*(q.reshape(1, 48, 4)[:, :40],) * 3,
                     mask=neighborhood_mask((8, 6), 3))
    with pytest.raises(ValueError, match=r"cls_tokens\[1\] \(k_cls\) must have shape"):
        neighborhood_attention(q, q, q, 3, cls_tokens=(q[:, :2, 0], q[:, :2, 0, :3],
                                                      q[:, :2, 0]))
    with pytest.raises(ValueError, match="x must have shape"):
        patch_merging(np.zeros((3, 4)))
    assert ra.mechanisms()["neighborhood_attention"].family == "vision"
