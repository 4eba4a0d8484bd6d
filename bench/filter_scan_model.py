"""A model of row_filter.cuh's chunk claims and decoupled look-back (kernels/cuda/row_filter.cuh),
not the kernel: CTAs as Python generators that claim a row's chunks (two ahead, or in order when
alone on the row), post their counts and running totals, and look back, run under random
schedules with fewer resident CTAs than the grid (a CTA starts when one finishes). It checks that
every chunk gets the offset of the chunks before it and that no schedule deadlocks (a spin that
never ends raises). Run it after changing the claim or look-back order:

    python3 bench/filter_scan_model.py      # -> ok 3000
"""
import random
POSTED, TOTAL = 1, 2
def run(P, per_row, slots, counts, rng):
    state = [None] * P          # (flag, value)
    counter = [0]
    def claim():
        c = counter[0]; counter[0] += 1; return c
    offsets = {}
    def cta(alone):
        # generator: yields while waiting (spins), returns when done
        c = 0 if alone else claim()
        pending = 1 if alone else claim()
        if c >= P: return
        yield
        prev_c, prev_total = -1, 0
        while c < P:
            ahead = None if alone else claim()
            nxt = c + 1 if alone else pending
            yield
            total = counts[c]
            if c > 0 and c - 1 == prev_c:
                off = prev_total
            elif c > 0:
                state[c] = (POSTED, total)
                off = 0
                j = c - 1
                while True:
                    if j == prev_c:
                        off += prev_total; break
                    while state[j] is None:
                        yield 'spin'
                    f, v = state[j]
                    off += v
                    if f == TOTAL: break
                    j -= 1
            else:
                off = 0
            prev_c, prev_total = c, off + total
            state[c] = (TOTAL, off + total)
            offsets[c] = off
            yield
            c = nxt
            pending = ahead
    pending = [per_row == 1] * per_row
    running = []
    steps = 0
    while pending or running:
        while pending and len(running) < slots:
            running.append(cta(pending.pop()))
        g = rng.choice(running)
        try:
            next(g)
        except StopIteration:
            running.remove(g)
        steps += 1
        if steps > 10**6: raise RuntimeError("deadlock")
    exp = 0
    for c in range(P):
        assert offsets[c] == exp, (c, offsets[c], exp)
        exp += counts[c]
    assert state[P - 1] == (TOTAL, exp)
rng = random.Random(1)
n = 0
for trial in range(3000):
    P = rng.randint(1, 20)
    per_row = rng.randint(1, P)
    slots = rng.randint(1, per_row)
    counts = [rng.randint(0, 50) for _ in range(P)]
    run(P, per_row, slots, counts, rng); n += 1
print("ok", n)
