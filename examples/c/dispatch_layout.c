/*
 * dispatch_layout.c: the libdeepep C ABI end to end on every GPU of one machine, one process per GPU.
 *
 * The parent process makes the bootstrap id (it never touches CUDA), then forks one child per GPU. Each child
 * creates its communicator, computes the dispatch layout of a made-up router output on its GPU and checks it
 * against the same computation on the host.
 *
 * Build (or `make` in this folder):
 *   cc -std=c99 -O2 dispatch_layout.c -I$(python -m pydeepep --include-dir) -I/usr/local/cuda/include \
 *      -L$(python -m pydeepep --lib-dir) -Wl,-rpath,$(python -m pydeepep --lib-dir) -ldeepep \
 *      -L/usr/local/cuda/lib64 -lcudart -o dispatch_layout
 *
 * Run:
 *   ./dispatch_layout [NUM_GPUS]
 * NUM_GPUS: the argument, else $DEEPEP_NUM_GPUS, else the entries of $CUDA_VISIBLE_DEVICES, else the GPUs under
 * /proc/driver/nvidia/gpus, else 1.
 * Prints one line per rank, e.g. "rank 0/2: layout OK (tokens per rank: 40 37)"; exits 0 when every rank agrees
 * with the host, 1 otherwise.
 */
#define _POSIX_C_SOURCE 200809L

#include <cuda_runtime.h>
#include <deepep/deepep.h>
#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define NUM_TOKENS 64
#define NUM_TOPK 8
#define EXPERTS_PER_RANK 16
#define MAX_GPUS 64

/* Reports a failed libdeepep call with the code's text and what the library found wrong. */
#define CHECK_DEEPEP(rank, call)                                                                               \
  do {                                                                                                         \
    deepepResult_t check_result_ = (call);                                                                     \
    if (check_result_ != deepepSuccess) {                                                                      \
      fprintf(stderr, "rank %d: %s failed: %s (%d): %s\n", (rank), #call, deepepGetErrorString(check_result_), \
              (int)check_result_, deepepGetLastErrorMessage());                                                \
      goto fail;                                                                                               \
    }                                                                                                          \
  } while (0)

#define CHECK_CUDA(rank, call)                                                                           \
  do {                                                                                                   \
    cudaError_t check_status_ = (call);                                                                  \
    if (check_status_ != cudaSuccess) {                                                                  \
      fprintf(stderr, "rank %d: %s failed: %s (%s)\n", (rank), #call, cudaGetErrorString(check_status_), \
              cudaGetErrorName(check_status_));                                                          \
      goto fail;                                                                                         \
    }                                                                                                    \
  } while (0)

/* ---- choosing the number of GPUs without initialising CUDA in the parent ---- */

static int parse_count(const char* text) {
  char* end = NULL;
  long value;
  if (text == NULL || *text == '\0') return -1;
  value = strtol(text, &end, 10);
  if (*end != '\0' || value < 1 || value > MAX_GPUS) return -1;
  return (int)value;
}

/* The GPUs this process may use, found without starting CUDA (which a process must not do before it forks): the
 * entries of CUDA_VISIBLE_DEVICES where it is set, else the directories the NVIDIA driver lists, one per GPU. */
static int count_visible_gpus(void) {
  const char* visible = getenv("CUDA_VISIBLE_DEVICES");
  DIR* dir;
  struct dirent* entry;
  int count = 0;
  if (visible != NULL) {
    const char* p;
    for (p = visible; *p != '\0'; ++p) {
      if ((p == visible || p[-1] == ',') && *p != ',') ++count;
    }
    return count;
  }
  dir = opendir("/proc/driver/nvidia/gpus");
  if (dir == NULL) return 0;
  while ((entry = readdir(dir)) != NULL) {
    if (entry->d_name[0] != '.') ++count;
  }
  closedir(dir);
  return count;
}

static int choose_num_gpus(int argc, char** argv) {
  int count;
  if (argc > 1) {
    count = parse_count(argv[1]);
    if (count < 0) fprintf(stderr, "NUM_GPUS must be an integer in [1, %d], not '%s'\n", MAX_GPUS, argv[1]);
    return count;
  }
  if (getenv("DEEPEP_NUM_GPUS") != NULL) {
    count = parse_count(getenv("DEEPEP_NUM_GPUS"));
    if (count < 0) fprintf(stderr, "DEEPEP_NUM_GPUS must be an integer in [1, %d]\n", MAX_GPUS);
    return count;
  }
  count = count_visible_gpus();
  if (count > MAX_GPUS) count = MAX_GPUS;
  return count > 0 ? count : 1;
}

/* ---- the router output and the host reference ---- */

/* xorshift64*: a small deterministic generator, so every run checks the same data. */
static uint64_t next_random(uint64_t* state) {
  *state ^= *state >> 12;
  *state ^= *state << 25;
  *state ^= *state >> 27;
  return *state * 0x2545F4914F6CDD1DULL;
}

/* Each token picks between 0 and NUM_TOPK distinct experts; the other slots, at random places, hold -1 ("no expert").
 */
static void make_topk_idx(int rank, int num_experts, int64_t* topk_idx) {
  uint64_t state = 0x9E3779B97F4A7C15ULL ^ (uint64_t)(rank + 1) * 0xBF58476D1CE4E5B9ULL;
  int t, k, j;
  for (t = 0; t < NUM_TOKENS; ++t) {
    int64_t* row = topk_idx + (size_t)t * NUM_TOPK;
    const int chosen = (int)(next_random(&state) % (NUM_TOPK + 1));
    const int shift = (int)(next_random(&state) % NUM_TOPK);
    for (k = 0; k < NUM_TOPK; ++k) row[k] = -1;
    for (k = 0; k < chosen; ++k) {
      int64_t* slot = &row[(k + shift) % NUM_TOPK];
      int fresh = 0;
      while (!fresh) {
        *slot = (int64_t)(next_random(&state) % (uint64_t)num_experts);
        fresh = 1;
        for (j = 0; j < NUM_TOPK; ++j) fresh = fresh && (&row[j] == slot || row[j] != *slot);
      }
    }
  }
}

/* What deepepGetDispatchLayout computes, on the host: a token counts once per rank it reaches. */
static void reference_layout(const int64_t* topk_idx, int nranks, int num_experts, int32_t* per_rank,
                             int32_t* per_expert, uint8_t* in_rank) {
  const int experts_per_rank = num_experts / nranks;
  int t, k, r;
  memset(per_rank, 0, sizeof(int32_t) * (size_t)nranks);
  memset(per_expert, 0, sizeof(int32_t) * (size_t)num_experts);
  memset(in_rank, 0, (size_t)NUM_TOKENS * (size_t)nranks);
  for (t = 0; t < NUM_TOKENS; ++t) {
    uint8_t* row = in_rank + (size_t)t * (size_t)nranks;
    for (k = 0; k < NUM_TOPK; ++k) {
      const int64_t expert = topk_idx[(size_t)t * NUM_TOPK + k];
      if (expert < 0) continue;
      ++per_expert[expert];
      row[expert / experts_per_rank] = 1;
    }
    for (r = 0; r < nranks; ++r) per_rank[r] += row[r];
  }
}

/* ---- one rank ---- */

static int run_rank(int rank, int nranks, const deepepUniqueId* id) {
  const int num_experts = EXPERTS_PER_RANK * nranks;
  const size_t topk_bytes = sizeof(int64_t) * NUM_TOKENS * NUM_TOPK;
  const size_t per_rank_bytes = sizeof(int32_t) * (size_t)nranks;
  const size_t per_expert_bytes = sizeof(int32_t) * (size_t)num_experts;
  const size_t in_rank_bytes = (size_t)NUM_TOKENS * (size_t)nranks;
  deepepComm_t comm = NULL;
  deepepConfig config;
  deepepResult_t async_error = deepepSuccess;
  cudaError_t status;
  cudaStream_t stream = NULL;
  int64_t* topk_idx = NULL;
  int32_t *per_rank = NULL, *per_expert = NULL, *want_per_rank = NULL, *want_per_expert = NULL;
  uint8_t *in_rank = NULL, *want_in_rank = NULL;
  void *d_topk_idx = NULL, *d_per_rank = NULL, *d_per_expert = NULL, *d_in_rank = NULL;
  int ok = 0, i;

  /* Host data first: the reference needs no GPU. */
  topk_idx = malloc(topk_bytes);
  per_rank = malloc(per_rank_bytes);
  want_per_rank = malloc(per_rank_bytes);
  per_expert = malloc(per_expert_bytes);
  want_per_expert = malloc(per_expert_bytes);
  in_rank = malloc(in_rank_bytes);
  want_in_rank = malloc(in_rank_bytes);
  if (!topk_idx || !per_rank || !want_per_rank || !per_expert || !want_per_expert || !in_rank || !want_in_rank) {
    fprintf(stderr, "rank %d: out of host memory\n", rank);
    goto fail;
  }
  make_topk_idx(rank, num_experts, topk_idx);
  reference_layout(topk_idx, nranks, num_experts, want_per_rank, want_per_expert, want_in_rank);

  /* CUDA starts here, in the child, after the fork. */
  status = cudaSetDevice(rank);
  if (status != cudaSuccess) {
    fprintf(stderr, "rank %d: cannot use GPU %d: %s (%s); this example needs one NVIDIA GPU per rank\n", rank, rank,
            cudaGetErrorString(status), cudaGetErrorName(status));
    goto fail;
  }

  CHECK_DEEPEP(rank, deepepConfigInit(&config, sizeof(config)));
  config.device = rank;
  config.num_topk = NUM_TOPK;
  config.num_experts = num_experts;
  config.max_tokens_per_rank = NUM_TOKENS;
  CHECK_DEEPEP(rank, deepepCommInitRank(&comm, nranks, id, rank, &config));

  CHECK_CUDA(rank, cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CHECK_CUDA(rank, cudaMalloc(&d_topk_idx, topk_bytes));
  CHECK_CUDA(rank, cudaMalloc(&d_per_rank, per_rank_bytes));
  CHECK_CUDA(rank, cudaMalloc(&d_per_expert, per_expert_bytes));
  CHECK_CUDA(rank, cudaMalloc(&d_in_rank, in_rank_bytes));
  CHECK_CUDA(rank, cudaMemcpy(d_topk_idx, topk_idx, topk_bytes, cudaMemcpyHostToDevice));

  /* Stream-ordered: the results are ready once the stream has reached this point. Row stride 0: contiguous rows. */
  CHECK_DEEPEP(rank,
               deepepGetDispatchLayout(comm, d_topk_idx, deepepInt64, NUM_TOKENS, NUM_TOPK, 0, num_experts,
                                       (int32_t*)d_per_rank, (int32_t*)d_per_expert, (uint8_t*)d_in_rank, stream));
  CHECK_CUDA(rank, cudaStreamSynchronize(stream));
  CHECK_CUDA(rank, cudaMemcpy(per_rank, d_per_rank, per_rank_bytes, cudaMemcpyDeviceToHost));
  CHECK_CUDA(rank, cudaMemcpy(per_expert, d_per_expert, per_expert_bytes, cudaMemcpyDeviceToHost));
  CHECK_CUDA(rank, cudaMemcpy(in_rank, d_in_rank, in_rank_bytes, cudaMemcpyDeviceToHost));

  /* Faults found on the device (an out-of-range expert id, say) are reported here, not by the call above. */
  CHECK_DEEPEP(rank, deepepCommGetAsyncError(comm, &async_error));
  if (async_error != deepepSuccess) {
    fprintf(stderr, "rank %d: asynchronous error %s (%d): %s\n", rank, deepepGetErrorString(async_error),
            (int)async_error, deepepGetLastErrorMessage());
    goto fail;
  }

  ok = 1;
  for (i = 0; i < nranks; ++i) {
    if (per_rank[i] != want_per_rank[i]) {
      fprintf(stderr, "rank %d: num_tokens_per_rank[%d] is %d, expected %d\n", rank, i, per_rank[i], want_per_rank[i]);
      ok = 0;
    }
  }
  for (i = 0; i < num_experts; ++i) {
    if (per_expert[i] != want_per_expert[i]) {
      fprintf(stderr, "rank %d: num_tokens_per_expert[%d] is %d, expected %d\n", rank, i, per_expert[i],
              want_per_expert[i]);
      ok = 0;
    }
  }
  for (i = 0; i < NUM_TOKENS * nranks; ++i) {
    if (in_rank[i] != want_in_rank[i]) {
      fprintf(stderr, "rank %d: is_token_in_rank[%d][%d] is %d, expected %d\n", rank, i / nranks, i % nranks,
              in_rank[i], want_in_rank[i]);
      ok = 0;
    }
  }
  if (ok) {
    printf("rank %d/%d: layout OK (tokens per rank:", rank, nranks);
    for (i = 0; i < nranks; ++i) printf(" %d", per_rank[i]);
    printf(")\n");
  } else {
    fprintf(stderr, "rank %d/%d: layout MISMATCH\n", rank, nranks);
  }

fail:
  /* Destroy is collective: every rank that created a communicator calls it, even after a mismatch. */
  if (comm != NULL) {
    deepepResult_t result = deepepCommDestroy(comm);
    if (result != deepepSuccess) {
      fprintf(stderr, "rank %d: deepepCommDestroy failed: %s (%d): %s\n", rank, deepepGetErrorString(result),
              (int)result, deepepGetLastErrorMessage());
      ok = 0;
    }
  }
  if (stream != NULL) cudaStreamDestroy(stream);
  if (d_topk_idx != NULL) cudaFree(d_topk_idx);
  if (d_per_rank != NULL) cudaFree(d_per_rank);
  if (d_per_expert != NULL) cudaFree(d_per_expert);
  if (d_in_rank != NULL) cudaFree(d_in_rank);
  free(topk_idx);
  free(per_rank);
  free(want_per_rank);
  free(per_expert);
  free(want_per_expert);
  free(in_rank);
  free(want_in_rank);
  fflush(stdout);
  fflush(stderr);
  return ok ? 0 : 1;
}

/* ---- the parent: id, fork, wait ---- */

static void stop_children(const pid_t* children, int spawned) {
  int i;
  for (i = 0; i < spawned; ++i) {
    if (children[i] > 0) kill(children[i], SIGTERM);
  }
}

int main(int argc, char** argv) {
  pid_t children[MAX_GPUS];
  deepepUniqueId id;
  deepepResult_t result;
  int nranks, rank, spawned = 0, running, failed = 0, version = 0;

  nranks = choose_num_gpus(argc, argv);
  if (nranks < 1) return 1;

  result = deepepGetVersion(&version);
  if (result != deepepSuccess) {
    fprintf(stderr, "deepepGetVersion failed: %s: %s\n", deepepGetErrorString(result), deepepGetLastErrorMessage());
    return 1;
  }
  /* Releases 0.x keep their ABI within a minor version (the soname names it), later ones within a major version. */
  if (version / 10000 != DEEPEP_VERSION_MAJOR ||
      (DEEPEP_VERSION_MAJOR == 0 && version / 100 % 100 != DEEPEP_VERSION_MINOR)) {
    fprintf(stderr, "libdeepep %d does not match the header's version %d.%d\n", version, DEEPEP_VERSION_MAJOR,
            DEEPEP_VERSION_MINOR);
    return 1;
  }

  /* Needs no GPU; the children get the id through fork (other launchers would send the bytes). */
  result = deepepGetUniqueId(&id);
  if (result != deepepSuccess) {
    fprintf(stderr, "deepepGetUniqueId failed: %s (%d): %s\n", deepepGetErrorString(result), (int)result,
            deepepGetLastErrorMessage());
    return 1;
  }

  fflush(stdout);
  fflush(stderr);
  for (rank = 0; rank < nranks; ++rank) {
    const pid_t pid = fork();
    if (pid < 0) {
      perror("fork");
      failed = 1;
      break;
    }
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL); /* a rank never outlives the parent (killed, say, by a test's timeout) */
      exit(run_rank(rank, nranks, &id));
    }
    children[spawned++] = pid;
  }

  /* A rank that fails leaves the others waiting in collectives until their timeout: stop them at once. */
  if (failed) stop_children(children, spawned);
  for (running = spawned; running > 0; --running) {
    int status = 0, i;
    const pid_t pid = wait(&status);
    if (pid < 0) break;
    for (i = 0; i < spawned; ++i) {
      if (children[i] == pid) children[i] = 0; /* reaped: never signal its pid, which may be reused, again */
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      if (!failed) stop_children(children, spawned);
      failed = 1;
    }
  }
  if (failed) fprintf(stderr, "dispatch_layout: FAILED\n");
  return failed ? 1 : 0;
}
