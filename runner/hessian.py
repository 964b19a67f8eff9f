r"""The Hessian H = ∇²L(θ) of the mean loss over an analysis set, as products H·v (flatness.py).

    L(θ) = (1/|S|) Σ_B Σ_{(x,y)∈B} ℓ(f_θ(x), y)      H v = ∇_θ ⟨∇_θ L(θ), v⟩     (double backward)

Two ways to form H·v, the same numbers (tested):
    graph       the gradient's graph of every batch is built once (create_graph) and kept; each
                product is one backward pass through it (as PyHessian does for one batch). Fast;
                memory holds the activations and gradient graph of the whole set.
    recompute   each product redoes, batch by batch, the forward pass, the gradient with its graph
                and the backward through it (PyHessian's data-loader mode). About 2× the work of
                `graph`, memory of one batch.

Convolutions that read the data (an input that needs no gradient: the network's first layer) are
computed while the graph is built as the matrix product they are,

    conv(x, W) + b = W_mat · unfold(x) + b      W_mat = W as [C_out, C_in·k_h·k_w], unfold = im2col

because PyTorch's double backward of a convolution (`_convolution_double_backward`,
aten/src/ATen/native/Convolution.cpp) forms gI = convT(gO, ggW), the gradient with respect to the
convolution's input, whenever ggW is defined, whether or not the input needs it; for the first
layer that is a transposed convolution over the whole batch computed and thrown away in every
product (a third of a product's time on a small CNN, measured). The double backward of the matrix
product has no such term. Same numbers up to rounding (tested); the graph keeps unfold(x), C_in·k_h·k_w
values per output position, instead of x (about k_h·k_w/(s_h·s_w) times the first layer's input for
stride s: 9× for a 3×3 stride-1 convolution, 12× for ResNet-50's 7×7 stride-2 stem).

Top eigenpairs: scipy's ARPACK (eigsh, implicitly restarted Lanczos) on the operator, in float64
on the host, products in the model's dtype on its device.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _conv_as_matmul(conv, x, weight, bias):
    """conv._conv_forward for a 2-D convolution whose input x needs no gradient: W_mat · unfold(x) + b
    (groups 1, zero padding given as numbers); any other call goes to the module's own forward."""
    if (x.requires_grad or x.dim() != 4 or conv.groups != 1 or isinstance(conv.padding, str)
            or conv.padding_mode != "zeros"):
        return type(conv)._conv_forward(conv, x, weight, bias)
    n, _, h, w = x.shape
    size = [(d + 2 * p - dil * (k - 1) - 1) // s + 1 for d, p, dil, k, s in
            zip((h, w), conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)   # [N, C_in·k_h·k_w, L]
    out = weight.reshape(weight.shape[0], -1) @ cols.transpose(0, 1).reshape(cols.shape[1], -1)
    out = out.view(-1, n, *size).transpose(0, 1)                                       # [N, C_out, H', W']
    return out if bias is None else out + bias.view(1, -1, 1, 1)


@contextlib.contextmanager
def data_convs_as_matmul(model):
    """Within the block, every nn.Conv2d of `model` computes inputs that need no gradient as
    W_mat · unfold(x) (the module docstring says why); restored on exit."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and "_conv_forward" not in vars(m)]
    for m in convs:
        m._conv_forward = _conv_as_matmul.__get__(m)
    try:
        yield
    finally:
        for m in convs:
            del m._conv_forward


class HessianOperator:
    """H of L over `batches` ([(x, y)]), restricted to `params`; `H @ v` for a flat vector v
    (length = total parameter count, in the params' order). `count` counts the products."""

    def __init__(self, model, params, batches, mode="graph", loss_func=None, bar=None):
        if mode not in ("graph", "recompute"):
            raise ValueError(f"mode must be 'graph' or 'recompute', got {mode!r}")
        self.model, self.params, self.batches, self.mode, self.bar = model, list(params), batches, mode, bar
        self.loss_func = loss_func or (lambda out, y: F.cross_entropy(out, y, reduction="sum"))
        self.n = sum(len(y) for _, y in batches)
        p0 = self.params[0]
        self.shape = (sum(p.numel() for p in self.params),) * 2
        self.device, self.dtype = p0.device, p0.dtype
        self.count = 0
        self._grads = self._gradient() if mode == "graph" else None

    def _gradient(self, batches=None):
        """∇L as a list of tensors that keep their graph (create_graph) — summed over `batches`."""
        total = None
        for x, y in (self.batches if batches is None else batches):
            with torch.enable_grad(), data_convs_as_matmul(self.model):
                loss = self.loss_func(self.model(x), y) / self.n          # Σ_B ℓ / |S|
                g = torch.autograd.grad(loss, self.params, create_graph=True)
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return total

    def _split(self, v):
        out, at = [], 0
        for p in self.params:
            out.append(v[at:at + p.numel()].view_as(p))
            at += p.numel()
        return out

    def __matmul__(self, v):
        """H v for a flat tensor v (1-D)."""
        vs = self._split(v.to(self.device, self.dtype))
        if self.mode == "graph":
            hv = torch.autograd.grad(self._grads, self.params, grad_outputs=vs, retain_graph=True)
        else:
            hv = None
            for batch in self.batches:
                g = self._gradient([batch])
                h = torch.autograd.grad(g, self.params, grad_outputs=vs)
                hv = h if hv is None else [a + b for a, b in zip(hv, h)]
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        return torch.cat([t.reshape(-1) for t in hv]).detach()

    def scipy(self):
        """The operator as a float64 scipy LinearOperator (for ARPACK)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return (self @ x).double().cpu().numpy()
        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)


def top_eigenpairs(H, k=5, tol=1e-3, seed=0, which="LA"):
    """(eigenvalues, eigenvectors [dim, k] float64 numpy) of the k largest (which='LA') or smallest
    ('SA') algebraic eigenvalues of H, largest first for 'LA' and smallest first for 'SA'; ARPACK
    (scipy.sparse.linalg.eigsh) with a seeded start vector and relative tolerance `tol`."""
    import numpy as np
    from scipy.sparse.linalg import eigsh
    dim = H.shape[0]
    if not 0 < k < dim:
        raise ValueError(f"k must be in 1..{dim - 1} for {dim} parameters, got {k}")
    v0 = np.random.default_rng(seed).standard_normal(dim)
    values, vectors = eigsh(H.scipy(), k=k, which=which, tol=tol, v0=v0)
    order = np.argsort(-values if which == "LA" else values)
    return [float(v) for v in values[order]], vectors[:, order]


def curvature(model, params, batches, top_k=5, tol=1e-3, seed=0, hvp="graph", trace_rtol=0.05,
              trace_matvecs=100, density_steps=0, density_probes=4, density_width=None, bar=None):
    """The curvature record of flatness.py and the top eigenvectors ([dim, top_k] numpy):
    top-k eigenvalues (ARPACK), the trace (deflated by those eigenvectors, runner.spectrum.trace),
    and with density_steps > 0 the raw stochastic Lanczos quadrature, λ_min (the smallest Ritz
    value, an upper bound on it), the smoothing width σ and the smoothed density on a grid."""
    import time
    from runner import spectrum
    H = HessianOperator(model, params, batches, mode=hvp, bar=bar)
    t0 = time.perf_counter()
    eig, vectors = top_eigenpairs(H, top_k, tol, seed)
    t1, used = time.perf_counter(), H.count
    tr = spectrum.trace(H, trace_rtol, min(10, trace_matvecs), trace_matvecs, seed, Q=vectors, ritz=eig, bar=bar)
    t2 = time.perf_counter()
    rec = dict(hessian_top_eigenvalues=eig, hessian_eig_matvecs=used, hessian_eig_time_s=t1 - t0,
               hessian_trace=tr["estimate"], hessian_trace_low=tr["low"], hessian_trace_high=tr["high"],
               hessian_trace_level=spectrum.LEVEL, hessian_trace_matvecs=tr["matvecs"],
               hessian_trace_exact=tr["exact"], hessian_trace_deflated=tr["deflated"],
               hessian_trace_samples=tr["samples"], hessian_trace_time_s=t2 - t1, hvp=hvp)
    if density_steps:
        quad = spectrum.slq(H, density_steps, density_probes, seed + 1, bar)
        sigma = density_width or spectrum.default_width(quad)
        grid = spectrum.grid_for(quad, sigma)
        rec["spectral_density"] = {
            "nodes": [n.tolist() for n, _ in quad], "weights": [w.tolist() for _, w in quad],
            "sigma": sigma, "sigma_default": density_width is None,
            "eigenvalue": grid.tolist(), "density": spectrum.density(quad, sigma, grid).tolist()}
        rec["hessian_lambda_min"] = float(min(n.min() for n, _ in quad))
        rec["hessian_density_time_s"] = time.perf_counter() - t2
    return rec, vectors
