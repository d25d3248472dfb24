from pathlib import Path

from bench.profile import summarise


def test_samples_are_attributed_to_the_innermost_stage(tmp_path: Path) -> None:
    folded = tmp_path / "run.folded"
    folded.write_text(
        'process 1:"sieve moderator";run (services/moderator/pipeline.py:90);'
        "group (/work/main/services/moderator/stages/verify.py:70);"
        "map (/work/main/services/moderator/stages/workers.py:40);wait (threading.py:300) 30\n"
        'process 1:"sieve moderator";run (services/moderator/pipeline.py:90);'
        "prepare (/work/main/services/moderator/stages/prepare.py:50);fetch (services/common/fetch.py:10) 10\n"
        'process 1:"sieve moderator";process 2:"python -c from multiprocessing.spawn import spawn_main";'
        "prepare_image (/work/main/services/common/prepared.py:80);"
        "decode_image (/work/main/services/common/imaging.py:60) 60\n"
    )
    summary = summarise(folded)
    assert summary["samples"] == 100
    assert summary["by_stage"] == {"prepare: prepare_image": 0.6, "verify": 0.3, "prepare": 0.1}
    assert summary["top_self"]["decode_image (services/common/imaging.py)"] == 0.6
    assert summary["top_inclusive"]["run (services/moderator/pipeline.py)"] == 0.4
    assert summary["by_process"] == {"worker process": 0.6, "sieve moderator": 0.4}
