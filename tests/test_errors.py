"""errors.py: what NonFiniteLoss and TrainingCancelled tell the user about the step and the run folder."""
import math


from dopsd_core.errors import DopsdError, NonFiniteLoss, TrainingCancelled


def test_user_errors_and_training_stops_are_distinct():
    assert issubclass(DopsdError, Exception) and not issubclass(DopsdError, RuntimeError)
    assert issubclass(NonFiniteLoss, RuntimeError) and issubclass(TrainingCancelled, RuntimeError)
    assert not issubclass(NonFiniteLoss, DopsdError) and not issubclass(TrainingCancelled, DopsdError)


def test_non_finite_loss_names_the_step_value_and_the_kept_save():
    e = NonFiniteLoss(17, 10, float("nan"))
    msg = str(e)
    assert (e.step, e.last_saved_step) == (17, 10) and math.isnan(e.value)
    assert "step 17" in msg and "nan" in msg
    assert "keeps step 10" in msg and "nothing had been saved" not in msg
    assert "--resume" in msg and "--lr" in msg  # the fix
    assert "\n" not in msg  # the CLI prints it as one line
    assert "inf" in str(NonFiniteLoss(3, 2, float("inf")))


def test_non_finite_loss_before_any_save_says_nothing_was_saved():
    msg = str(NonFiniteLoss(1, None, float("inf")))
    assert "step 1" in msg and "nothing had been saved yet" in msg
    assert "keeps step" not in msg and "None" not in msg


def test_non_finite_loss_after_a_save_at_step_zero_names_step_zero():
    msg = str(NonFiniteLoss(1, 0, float("nan")))
    assert "keeps step 0" in msg and "nothing had been saved" not in msg


def test_training_cancelled_names_the_step_and_the_kept_save():
    e = TrainingCancelled(42, 40)
    msg = str(e)
    assert (e.step, e.last_saved_step) == (42, 40)
    assert "cancelled at step 42" in msg and "keeps step 40" in msg and "\n" not in msg
    assert "keeps step 0" in str(TrainingCancelled(0, 0))


def test_training_cancelled_before_any_save_says_nothing_was_saved():
    msg = str(TrainingCancelled(5, None))
    assert "step 5" in msg and "None" not in msg and "nothing" in msg
