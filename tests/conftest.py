import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# Cases of parametrised (or end-to-end) tests that run only with `-m slow`, to keep the default suite
# under two minutes on a 2-core machine; each test keeps at least one fast case (or a sibling test) as
# its stand-in in the default suite.
SLOW_CASES = frozenset(
    {
        "tests/test_trainer.py::test_signal_saves_and_resume_is_bit_identical[15]",
        "tests/test_compiled_adaptive.py::test_backprop_solution_and_gradients_match_eager[rk4-options3]",
        "tests/test_compiled_adaptive.py::test_backprop_solution_and_gradients_match_eager[midpoint-options2]",
        "tests/test_compiled_adaptive.py::test_cache_reuses_the_step_and_does_not_keep_the_model_alive",
        "tests/test_per_sample.py::test_per_sample_adjoint_matches_direct_gradients[True]",
        "tests/test_mnist_train.py::test_conv_models_loss_falls[resnet]",
        "tests/test_mnist_train.py::test_conv_models_loss_falls[rknet]",
        "tests/test_stiff.py::test_batch_of_independent_problems",
        "tests/test_stiff.py::test_robertson_against_radau[kvaerno3]",
        "tests/test_stiff.py::test_robertson_against_radau[kvaerno4]",
        "tests/test_module_compile.py::test_compile_fullgraph_equals_eager_with_gradients[euler-options1-t1]",
        "tests/test_latent.py::test_adjoint_gradients_match_direct[True]",
        "tests/test_spiral_demo.py::test_resume_is_bit_exact[adjoint]",
        "tests/test_odeint.py::test_adaptive_matches_reference[bosh3-arenstorf]",
        "tests/test_odeint.py::test_adaptive_matches_reference[tsit5-arenstorf]",
        "tests/test_dense_solution.py::test_equals_odeint_at_the_same_times[span0-adaptive_heun]",
        "tests/test_dense_solution.py::test_equals_odeint_at_the_same_times[span1-adaptive_heun]",
        "tests/test_dense_solution.py::test_equals_odeint_at_the_same_times[span0-kvaerno3]",
        "tests/test_dense_solution.py::test_equals_odeint_at_the_same_times[span1-kvaerno3]",
        "tests/test_func.py::test_vmap_over_parameters_equals_the_loop[bosh3]",
        "tests/test_cnf_experiment.py::test_train_cnf_writes_run_folder_and_resumes",
        "tests/test_per_sample.py::test_per_sample_adjoint_matches_direct_gradients[False]",
        "tests/test_adjoint_sensitivity.py::test_sensitivity_matches_direct_and_finite_differences[tuple-backsolve]",
        "tests/test_adjoint_sensitivity.py::test_sensitivity_matches_direct_and_finite_differences[tuple-interpolating]",
        "tests/test_gradients.py::test_gradients_match_finite_differences[mlp-direct]",
        "tests/test_gradients.py::test_gradients_match_finite_differences[reverse-direct]",
        "tests/test_gradients.py::test_adjoint_every_method_matches_direct[adaptive_heun]",
        "tests/test_gradients.py::test_checkpoint_equals_direct_every_method[adaptive_heun]",
        "tests/test_odeint.py::test_adaptive_matches_reference[dopri8-arenstorf]",
        "tests/test_odeint.py::test_adaptive_agrees_with_torchdiffeq[adaptive_heun]",
        "tests/test_cnf.py::test_reference_densities_of_moons_and_circles_are_normalised",
        "tests/test_methods_extra.py::test_adjoint_through_extra_methods_matches_direct[radauIIA5]",
        "tests/test_stiff.py::test_float32",
        "tests/test_compiled.py::test_compiled_step_equals_eager_values_and_gradients[rk4]",
        "tests/test_adjoint_higher_order.py::test_hvp_through_adjoint_matches_direct_and_double_finite_differences[rk4]",
        "tests/test_mnist_train.py::test_resume_in_process_gives_identical_weights",
        "tests/test_latent.py::test_cli_train_and_resume",
        "tests/test_func.py::test_gradient_through_vmap_equals_the_loop[rk4]",
        "tests/test_compiled_adaptive.py::test_a_new_lambda_per_solve_reuses_the_compiled_step",
        "tests/test_compiled_adaptive.py::test_adjoint_with_a_compiled_forward_solve",
        "tests/test_throw.py::test_failure_cell[throw-ros34pw2-joint-eager-direct]",
        "tests/test_per_sample.py::test_gradients_agree_with_per_sample_adjoint_solves",
        "tests/test_stiff.py::test_gradient_against_finite_differences[krylov]",
        "tests/test_cnf.py::test_learned_density_integrates_to_one",
        "tests/test_compiled_adaptive.py::test_backprop_solution_and_gradients_match_eager[dopri5-options0]",
        "tests/test_compiled_adaptive.py::test_events_and_jump_t_with_compile",
        "tests/test_gradients.py::test_adjoint_gradcheck",
        "tests/test_odeint.py::test_adaptive_matches_reference[dopri5-arenstorf]",
    }
)


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if item.nodeid in SLOW_CASES:
            item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
