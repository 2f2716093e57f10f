/* The host's own floor under the engine's step-time tail: a plain C loop of fixed work, timed per
 * repetition, with no Python, allocation, OpenMP or I/O. Whatever tail it shows (preemption by other
 * processes, interrupts, frequency changes, the hypervisor) every engine step can show too.
 *
 * Usage: host_jitter <target_ms> <repetitions>   (prints one JSON line of per-repetition times in ms)
 * Built and run by benchmarks/step_jitter.py --compare.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static volatile double sink;

static void work(long n) {
    double x = 1.0;
    for (long i = 0; i < n; i++) x = x * 1.0000001 + 1e-9;
    sink = x;
}

static int cmp(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <target_ms> <repetitions>\n", argv[0]);
        return 2;
    }
    double target_ms = atof(argv[1]);
    int reps = atoi(argv[2]);
    if (target_ms <= 0 || reps <= 0) return 2;
    long n = 1000000;  /* calibrate: the median of 9 runs of n iterations, scaled to the target */
    double t[9];
    for (int i = 0; i < 9; i++) {
        double s = now_ms();
        work(n);
        t[i] = now_ms() - s;
    }
    qsort(t, 9, sizeof t[0], cmp);
    n = (long)(n * target_ms / t[4]);
    double *ms = malloc(sizeof(double) * reps);
    if (!ms) return 1;
    for (int i = 0; i < reps; i++) {
        double s = now_ms();
        work(n);
        ms[i] = now_ms() - s;
    }
    printf("{\"ms\": [");
    for (int i = 0; i < reps; i++) printf(i ? ",%.4f" : "%.4f", ms[i]);
    printf("]}\n");
    free(ms);
    return 0;
}
