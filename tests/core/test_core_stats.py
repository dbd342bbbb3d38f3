"""The caveats every plugin prints beside a bootstrap interval."""

from tubcli.stats import say_if_rough


class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, msg, *args):
        self.lines.append(msg % args)


def test_say_if_rough_names_too_few_resamples_and_too_few_units():
    log = _Log()
    say_if_rough(log, 1000, 40)
    assert log.lines == []  # the usual case: no caveat
    say_if_rough(log, 100, 40)
    assert len(log.lines) == 1 and "--bootstrap 100" in log.lines[0]
    say_if_rough(log, 1000, 2, "test slides")
    assert len(log.lines) == 2 and "resamples only 2 test slides" in log.lines[1]
