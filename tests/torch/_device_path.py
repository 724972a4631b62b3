"""Options that together take every branch of ``Kron.step()`` that could read a tensor back to
the host: the random schedule, MARS, cautious updates, gradient clipping and weight decay. The
CPU emulation of the device path (tests/torch/test_conventions.py) and the CUDA check
(tests/gpu/test_torch_device.py) both use them, so a branch added to one is checked by both."""

EVERY_STEP_BRANCH = dict(
    stochastic_schedule=True,
    mars=True,
    caution=True,
    gradient_clipping="rms",
    weight_decay=1e-2,
)
