"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""


class DopsdError(Exception):
    """Bad input or configuration. The message names the problem and the fix."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf. The run folder still holds the last good save."""

    def __init__(self, step: int, last_saved_step: int | None, value: float):
        self.step, self.last_saved_step, self.value = step, last_saved_step, value
        kept = f"the run folder keeps step {last_saved_step}" if last_saved_step is not None else \
            "nothing had been saved yet"
        super().__init__(f"loss became {value} at step {step}; training stopped and {kept}. "
                         "Lower --lr or check the data, then --resume the run folder.")


class TrainingCancelled(RuntimeError):
    def __init__(self, step: int, last_saved_step: int | None):
        self.step, self.last_saved_step = step, last_saved_step
        kept = f"the run folder keeps step {last_saved_step}" if last_saved_step is not None else "nothing was saved"
        super().__init__(f"training cancelled at step {step}; {kept}")
