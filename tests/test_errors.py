"""errors.run_cli: a user mistake is one `error:` line and exit status 2, said once under torchrun."""

import pytest

from gptlab import errors
from gptlab.errors import UsageError, run_cli


def mistake() -> None:
    raise UsageError("--batch_size must be a positive integer, got 0")


def exit_status(capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(mistake)
    return e.value.code, capsys.readouterr().err


def test_a_mistake_is_one_line_and_status_2(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    assert exit_status(capsys) == (2, "error: --batch_size must be a positive integer, got 0\n")
    monkeypatch.setenv("RANK", "0")  # torchrun's rank 0 says it as a single process does
    assert exit_status(capsys) == (2, "error: --batch_size must be a positive integer, got 0\n")


def test_under_torchrun_other_ranks_wait_for_rank_0_to_say_it(monkeypatch, capsys):
    """Rank 0 meets the same mistake and exits first; torchrun then stops the other ranks while they wait, so
    they print nothing. A mistake only a later rank meets is still said, with its rank."""
    monkeypatch.setenv("RANK", "3")

    def stopped_by_torchrun(seconds: float) -> None:
        assert seconds == errors.OTHER_RANKS_WAIT_S >= 1  # well above torchrun's 0.1 s check
        raise SystemExit(-15)

    monkeypatch.setattr(errors.time, "sleep", stopped_by_torchrun)
    assert exit_status(capsys) == (-15, "")
    monkeypatch.setattr(errors.time, "sleep", lambda seconds: None)  # rank 0 did not fail: nobody stops rank 3
    assert exit_status(capsys) == (2, "[rank 3] error: --batch_size must be a positive integer, got 0\n")


def test_ctrl_c_under_torchrun_is_said_by_rank_0_and_no_rank_waits(monkeypatch, capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(errors.time, "sleep", lambda seconds: pytest.fail("a Ctrl-C must not wait"))
    for rank, said in (("0", "interrupted\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            run_cli(interrupted)
        assert (e.value.code, capsys.readouterr().err) == (130, said)
