"""After ``pip install``, a fresh process finds the ``blaze`` backend without importing blazec."""

import json
import subprocess
import sys
import textwrap


def test_fresh_process_finds_and_uses_blaze():
    code = textwrap.dedent(
        """
        import json, sys
        import torch
        assert "blazec" not in sys.modules
        listed = "blaze" in torch._dynamo.list_backends()
        m = torch.nn.Linear(4, 3)
        x = torch.randn(2, 4)
        y = torch.compile(m, backend="blaze", options={"final_stage": "eager"})(x)
        print(json.dumps({"listed": listed, "err": (y - m(x)).abs().max().item(),
                          "imported_by_compile": "blazec.backend" in sys.modules}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["listed"] is True
    assert result["imported_by_compile"] is True
    assert result["err"] == 0.0


def test_torch_logs_blazec_prints_reports():
    code = textwrap.dedent(
        """
        import torch, torch.nn.functional as F
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = torch.nn.Linear(8, 4, bias=False)
                self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))
            def forward(self, x):
                w, ids = torch.topk(F.softmax(self.gate(x), -1), 2, dim=-1)
                out = torch.zeros_like(x)
                mask = F.one_hot(ids, 4).permute(2, 1, 0)
                for e in range(4):
                    slot, tok = torch.where(mask[e])
                    out.index_add_(0, tok, F.relu(self.experts[e](x[tok])) * w[tok, slot, None])
                return out
        torch.compile(M(), backend="blaze", options={"final_stage": "eager"})(torch.randn(6, 8))
        """
    )
    env = {**__import__("os").environ, "TORCH_LOGS": "+blazec"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[moe_dispatch]" in proc.stderr
    assert "partitioner: min_cut_rematerialization_partition" in proc.stderr
