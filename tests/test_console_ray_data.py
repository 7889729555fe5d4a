"""console.quiet_ray_data: the one switch for Ray Data's progress bars."""

from ray.data import DataContext

from tensormask_ray.console import quiet_ray_data


def test_quiet_ray_data_turns_bars_off_and_a_with_statement_puts_them_back():
    context = DataContext.get_current()
    saved = context.enable_progress_bars
    try:
        context.enable_progress_bars = True
        with quiet_ray_data():
            assert context.enable_progress_bars is False
        assert context.enable_progress_bars is True  # restored at the end of the statement
        quiet_ray_data()  # a plain call: off from now on
        assert context.enable_progress_bars is False
    finally:
        context.enable_progress_bars = saved
