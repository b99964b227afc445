from .peer import apply, init, vjp


class PEER:
    """The reference as a minimal stateful layer: holds params and batch-norm state (NumPy
    arrays keyed by canonical names), updates the state in training.

    ``seed`` gives the reference's tables, ``peer_ref.init(cfg, seed)`` (SPEC §8); NumPy has
    no global random state for layers to follow. A call takes and returns what
    ``peer_ref.forward`` does: x (..., d_model), mask (``x.shape[:-1]``, bool, True keeps a
    token), routing (..., heads, topk); y (..., d_out), and ``(y, aux)`` with ``return_aux=True``.
    """

    def __init__(self, cfg, seed=0, dtype=None, implementation=None):
        self.cfg, self.implementation = cfg, implementation
        self.params, self.state = init(cfg, seed=seed, dtype=dtype)
        self.training = True
        self.aux = None

    def __call__(self, x, mask=None, routing=None, *, return_aux=False):
        y, self.state, self.aux = apply(
            self.cfg, self.params, self.state, x, self.training, mask, routing, implementation=self.implementation
        )
        return (y, self.aux) if return_aux else y

    def vjp(self, x, dy, mask=None, routing=None):
        """Gradients at the current parameters, in the current mode (state is not updated)."""
        return vjp(
            self.cfg, self.params, self.state, x, dy, self.training, mask, routing, implementation=self.implementation
        )

    def __repr__(self):
        tables = ", ".join(
            f"{name}: {value.shape} {value.dtype}" for name, value in {**self.params, **self.state}.items()
        )
        return f"PEER({self.cfg!r}, training={self.training}; {tables})"
