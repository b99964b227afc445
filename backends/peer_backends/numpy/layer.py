from .peer import apply, init, vjp


class PEERLayer:
    """A minimal stateful wrapper: holds params and batch-norm state, updates state in training."""

    def __init__(self, cfg, seed=0, dtype=None, implementation=None):
        self.cfg, self.implementation = cfg, implementation
        self.params, self.state = init(cfg, seed=seed, dtype=dtype)
        self.training = True

    def __call__(self, x, mask=None, routing=None):
        y, self.state, self.aux = apply(self.cfg, self.params, self.state, x, self.training, mask, routing,
                                         implementation=self.implementation)
        return y

    def vjp(self, x, dy, mask=None, routing=None):
        """Gradients at the current parameters, in the current mode (state is not updated)."""
        return vjp(self.cfg, self.params, self.state, x, dy, self.training, mask, routing,
                   implementation=self.implementation)
