"""coco.quiet_stdout silences pycocotools in a plain process and in a Ray Train worker, whose
`print` Ray replaces with one that also logs each line to the root logger."""

from __future__ import annotations

import builtins
import logging

from pycocotools.coco import COCO
from ray.train.v2._internal.logging.patch_print import print_context_manager, redirected_print

from tensormask_ray.evaluation.coco import quiet_stdout

_DATASET = {
    "images": [{"id": 1, "width": 4, "height": 4}],
    "categories": [{"id": 1, "name": "a"}],
    "annotations": [],
}


def _index() -> None:
    coco = COCO()
    coco.dataset = dict(_DATASET)
    coco.createIndex()  # prints "creating index..." and "index created!"


def test_quiet_stdout_keeps_pycocotools_off_stdout_without_replacing_print(capsys):
    original = builtins.print
    with quiet_stdout() as sink:
        assert builtins.print is original
        _index()
    assert builtins.print is original
    assert capsys.readouterr().out == ""
    assert "index created!" in sink.getvalue()
    _index()
    assert "index created!" in capsys.readouterr().out  # the context is what silenced it


def test_quiet_stdout_silences_pycocotools_under_ray_train_print(caplog, capsys):
    caplog.set_level(logging.INFO)
    with print_context_manager(redirected_print):  # Ray Train's worker print (patch_print.py)
        _index()
        assert "index created!" in caplog.text  # what a worker logs without quiet_stdout
        caplog.clear()
        with quiet_stdout():
            _index()
            print("our own line")
        assert "index created!" not in caplog.text and "creating index" not in caplog.text
        assert "our own line" in caplog.text  # only pycocotools' records are dropped
    assert logging.getLogger().filters == []  # the filter is gone with the context
    capsys.readouterr()
