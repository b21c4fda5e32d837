"""Mamba's ``selective_scan_ref`` transcribed in float64 PyTorch on tensors, shared by the
forward tests (tests/test_ssm.py) and the gradient tests (tests/test_gradients_ssm.py):
an independent form written from mamba_ssm's equations, never from refattn's code."""
import torch

F = torch.nn.functional


def torch_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, cu_seqlens=None):
    """``selective_scan_ref`` (mamba_ssm) transcribed in float64 PyTorch on tensors, as
    ``tests/test_ssm.py``'s transcription (which converts from NumPy): one step at a
    time, einsums over the state; returns ``(out, last_state)``."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim, length = A.shape[0], u.shape[2]

    def variable(X):
        if A.is_complex() and X.dim() >= 3 and not X.is_complex():
            X = torch.view_as_complex(X.reshape(X.shape[:-1] + (length, 2)))
        if X.dim() == 4:
            X = X.repeat_interleave(dim // X.shape[1], dim=1)
        return X

    B, C = variable(B), variable(C)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta.to(A.dtype), A))
    if B.dim() == 2:
        dBu = torch.einsum("bdl,dn->bdln", (delta * u).to(B.dtype), B)
    elif B.dim() == 3:
        dBu = torch.einsum("bdl,bnl->bdln", (delta * u).to(B.dtype), B)
    else:
        dBu = torch.einsum("bdl,bdnl->bdln", (delta * u).to(B.dtype), B)
    x = torch.zeros(dA.shape[:2] + dA.shape[3:], dtype=dA.dtype)
    ys = []
    starts = [] if cu_seqlens is None else list(cu_seqlens[1:-1])
    for i in range(length):
        x = dBu[:, :, i] if i in starts else dA[:, :, i] * x + dBu[:, :, i]
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C.to(x.dtype))
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i].to(x.dtype))
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i].to(x.dtype))
        ys.append(y.real * 2 if y.is_complex() else y)
    out = torch.stack(ys, dim=2)
    if D is not None:
        out = out + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    return out, x
