"""Kernel alignment: how the eNTK rotates during training, at about one kernel's cost per look.

Dimensions: N examples (N_train first, then N_test), k vectors, L layers.

    quotients, frobenius_sq = quotients_of_kernel(kernel, eigvecs, num_train=n)   # K formed
    measurement = measure_kernel(apply_fn, params, x, eigvecs, num_train=n, by_layer=True,
                                 reference=Reference(frobenius_sq, kernel=k0))     # streamed
    measurement.quotients["all"], measurement.layer_quotients, measurement.kernel_distance
    quotients = rayleigh_quotients(apply_fn, params, x, eigvecs, method="operator")  # K·V only

The Rayleigh quotient φᵀKφ/‖φ‖² of an initial eigenvector φ measures the kernel along φ; the
study compares it at the end of training with its value at initialization (its eigenvalue). The
streamed pass (:func:`measure_kernel`) never holds K: it adds each block of the kernel (and each
layer's share of it) to the quotients, to ‖K‖_F² and to ⟨K_0, K⟩_F, the kernel distance of Fort
et al. (2020). The operator method (``rayleigh_quotients(..., method="operator")``) needs
O(m·P) memory whatever N, through K·V = J(JᵀV).
"""

from ntklab.alignment._kernel import quotients_of_kernel
from ntklab.alignment._operator import METHODS, aligned_indices, rayleigh_quotients
from ntklab.alignment._stream import Measurement, Reference, measure_kernel

__all__ = [
    "METHODS",
    "Measurement",
    "Reference",
    "aligned_indices",
    "measure_kernel",
    "quotients_of_kernel",
    "rayleigh_quotients",
]
