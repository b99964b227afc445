"""peer_train — a byte-level transformer whose feed-forward is a PEER layer, trained on real text.

    python -m peer_train train --ffn peer --steps 600      # one model (--sparse: row-sparse table steps)
    python -m peer_train all --quick                       # every experiment, minute-scale

Experiments (``peer_train.experiments``): isoFLOP in miniature (dense FFN vs PEER vs PEER without
query batch norm at equal FLOPs per token), the paper's Table 2 in miniature (expert usage and
unevenness), a trained layer moved between frameworks with ``peer_backends.save`` / ``load``, and
the paper's pool-size ablation in miniature (N from 32² to 1024² trained with row-sparse table
gradients, SPEC §7.1, and the lazy optimizer against AdamW).
The models are built in torch or JAX through ``peer_backends.layer``. Importing this package
imports no framework.
"""
