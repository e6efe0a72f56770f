"""Named kill points for fault-injection tests.

``SKMM_KILL_AT=<point>`` in the environment makes the process kill itself with SIGKILL (no cleanup,
no ``finally``, as ``kill -9`` or a power cut would) when it reaches that point; unset, a kill point
costs one dictionary lookup. Points, in the order a demo reaches them:

* ``pretrained_weights``: the model's weights file written to its temporary name, not yet renamed;
* ``raw_shard_write``: a shard's structure-score file (``raw_shard``) written, not yet renamed;
* ``raw_shard_registered``: the shard admitted to the content-hash registry, its ``raw_shard`` not recorded;
* ``gradient_sketch``: a sketching step holding its ``gpu`` pool slot, before it writes;
* ``sketch_rows``: the sketch file written, before its manifest;
* ``version_swap``: the new subset moved into ``data/``, not yet added to DVC;
* ``version_dvc_add``: ``data.dvc`` written, no history commit or tag yet;
* ``version_tag``: the version tagged, its push not yet queued;
* ``version_queued``: its push queued, the version's journal not yet cleared;
* ``version_push``: its data uploaded to the remote, the push queue not yet rewritten;
* ``version_mlflow``: the version complete, its MLflow run open without the version's tags;
* ``finetune_eval``: its MLflow run open and half logged.
"""

from __future__ import annotations

import os
import signal

ENV = "SKMM_KILL_AT"


def kill_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
