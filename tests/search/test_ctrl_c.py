"""Ctrl-C during a study: raised at once inside a trial's work, deferred across storage writes, never lost."""

import signal

import pytest

from autoq.search.ctrl_c import CTRL_C


def press_ctrl_c():
    signal.raise_signal(signal.SIGINT)


def test_inside_work_ctrl_c_raises_at_once():
    reached = []
    with pytest.raises(KeyboardInterrupt), CTRL_C.deferred():
        with CTRL_C.work():
            press_ctrl_c()
            reached.append("after the press")
    assert reached == []


def test_outside_work_ctrl_c_waits_for_the_write_to_finish_then_raises_at_the_next_work_block():
    done = []
    with pytest.raises(KeyboardInterrupt), CTRL_C.deferred():
        press_ctrl_c()
        done.append("storage write")  # runs to its end
        with CTRL_C.work():
            done.append("next candidate")  # never started
    assert done == ["storage write"]


def test_ctrl_c_pressed_outside_work_stops_the_study_when_it_ends():
    with pytest.raises(KeyboardInterrupt), CTRL_C.deferred():
        press_ctrl_c()


def test_ctrl_c_swallowed_inside_work_still_stops_the_study():
    with pytest.raises(KeyboardInterrupt), CTRL_C.deferred():
        with CTRL_C.work():
            try:  # like a finalizer, which prints and drops the exception
                press_ctrl_c()
            except KeyboardInterrupt:
                pass


def test_a_second_ctrl_c_raises_even_outside_work():
    with pytest.raises(KeyboardInterrupt), CTRL_C.deferred():
        press_ctrl_c()
        press_ctrl_c()
        pytest.fail("the second press did not raise")


def test_the_previous_handler_is_restored_and_a_new_study_starts_unpressed():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), CTRL_C.deferred():
        press_ctrl_c()
    assert signal.getsignal(signal.SIGINT) is before
    with CTRL_C.deferred(), CTRL_C.work():
        pass
