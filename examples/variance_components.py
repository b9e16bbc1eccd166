"""statsmodels' variance-components notebook, run on sparsemix.

Only the imports differ from the notebook: `import sparsemix as sm` and `from sparsemix import VCSpec`.
The data are the notebook's (numpy's generator seeded with 3123), so the printed numbers can be compared
with the notebook's output line by line.
"""

import time

import numpy as np

import sparsemix as sm
from sparsemix import VCSpec
from sparsemix.datasets import generate_crossed, generate_nested

np.random.seed(3123)

# --- Nested analysis: group 2 within group 1 ------------------------------------------------------------
df = generate_nested(rng=np.random.mtrand._rand)

t0 = time.perf_counter()
model1 = sm.MixedLM.from_formula(
    "y ~ 1", re_formula="1", vc_formula={"group2": "0 + C(group2)"}, groups="group1", data=df
)
result1 = model1.fit()
print(result1.summary())
print(f"(nested, formula route: {time.perf_counter() - t0:.3f} s)\n")


def f(x):
    # The notebook builds each group's indicator matrix by hand, dense and per group.
    n = x.shape[0]
    g2 = x.group2
    u = g2.unique()
    u.sort()
    uv = {v: k for k, v in enumerate(u)}
    mat = np.zeros((n, len(u)))
    for i in range(n):
        mat[i, uv[g2.iloc[i]]] = 1
    colnames = ["%d" % z for z in u]
    return mat, colnames


vcm = [f(g) for _, g in df.groupby("group1")]
mats = [x[0] for x in vcm]
colnames = [x[1] for x in vcm]
names = ["group2"]
vcs = VCSpec(names, [colnames], [mats])

t0 = time.perf_counter()
oo = np.ones(df.shape[0])
model2 = sm.MixedLM(df.y, oo, exog_re=oo, groups=df.group1, exog_vc=vcs)
result2 = model2.fit()
print(result2.summary())
print(f"(nested, VCSpec route: {time.perf_counter() - t0:.3f} s)\n")

# --- Crossed analysis: one group, both factors as variance components -----------------------------------
df = generate_crossed(rng=np.random.mtrand._rand)

t0 = time.perf_counter()
vc = {"g1": "0 + C(group1)", "g2": "0 + C(group2)"}
oo = np.ones(df.shape[0])
model3 = sm.MixedLM.from_formula("y ~ 1", groups=oo, vc_formula=vc, data=df)
result3 = model3.fit()
print(result3.summary())
print(f"(crossed, formula route: {time.perf_counter() - t0:.3f} s)\n")


def f(g):
    n = len(g)
    u = g.unique()
    u.sort()
    uv = {v: k for k, v in enumerate(u)}
    mat = np.zeros((n, len(u)))
    for i in range(n):
        mat[i, uv[g[i]]] = 1
    colnames = ["%d" % z for z in u]
    return [mat], [colnames]


vcm = [f(df.group1), f(df.group2)]
mats = [x[0] for x in vcm]
colnames = [x[1] for x in vcm]
names = ["group1", "group2"]
vcs = VCSpec(names, colnames, mats)

t0 = time.perf_counter()
oo = np.ones(df.shape[0])
model4 = sm.MixedLM(df.y, oo[:, None], exog_re=None, groups=oo, exog_vc=vcs)
result4 = model4.fit()
print(result4.summary())
print(f"(crossed, VCSpec route: {time.perf_counter() - t0:.3f} s)")
