import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import MLP, MLP_RULES_DP, MLP_RULES_TP
from tests.jaxmodels.models.helpers import sharded_forward


@pytest.mark.parametrize("rules_name", ["dp", "tp"])
def test_sharded_equals_unsharded(rules_name, mesh, mesh_2d):
    rules, m = (MLP_RULES_DP, mesh) if rules_name == "dp" else (MLP_RULES_TP, mesh_2d)
    model = MLP(features=(16, 16), num_outputs=10)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    x = jax.random.normal(jax.random.key(1), (8, 64))
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    out, p = sharded_forward(apply_fn, params, x, rules, m)
    if rules_name == "tp" and m.shape["model"] > 1:
        assert p["Dense_0"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    np.testing.assert_allclose(out, jax.jit(apply_fn)(params, x), atol=1e-5, rtol=1e-5)
