# Stand-in for the missing shared/peers/sysnoise.py (issue10 run): no noise accounting.
def snapshot(pids): return None
def foreign_cpu_pct(a, b): return float("nan")
