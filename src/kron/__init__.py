"""kron: PSGD-Kron (Kronecker-factored preconditioned SGD) for NumPy, PyTorch, JAX and Keras 3.

Front ends live in submodules and import their framework only when imported themselves:
``kron.numpy.KronPsgd``, and the math they share in ``kron.core``.
"""

__version__ = "0.1.0"
