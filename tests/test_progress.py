"""progress_bar follows both its caller's flag and TQDM_DISABLE."""
from sparsequant.progress import disabled_by_env, progress_bar


def test_env_switch(monkeypatch):
    for value, off in [("1", True), ("true", True), ("0", False), ("", False), ("False", False)]:
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert disabled_by_env() is off
        assert progress_bar(total=3).disable is off
    monkeypatch.delenv("TQDM_DISABLE")
    assert progress_bar(total=3, enabled=False).disable is True
    assert progress_bar(total=3).disable is False
