// A C ABI over libtorch's c10d: a process group (Gloo for CPU tensors, NCCL for CUDA tensors
// when built with CALDPO_NCCL) rendezvoused through a TCPStore, the collectives the trainer
// needs, and a heartbeat the trainer reads to name a rank that died or hangs.
//
// Tensors cross the boundary as `at::Tensor*`, which is what tch's C_tensor handles point to.
// Every function catches C++ exceptions and reports them through `err` (a caller buffer):
// an exception must never unwind into Rust.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef CALDPO_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

using Millis = std::chrono::milliseconds;

// How long a read or write of caldpo's own keys (joins, heartbeats, collective counts) may
// take once the store is up.
constexpr Millis kProbeTimeout{5000};

void report(char* err, size_t len, const std::string& message) {
  if (err == nullptr || len == 0) return;
  size_t n = std::min(message.size(), len - 1);
  std::memcpy(err, message.data(), n);
  err[n] = '\0';
}

// Runs `body`, turning any exception into -1 and a message without a C++ backtrace.
template <typename F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    report(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    report(err, len, e.what());
  } catch (...) {
    report(err, len, "unknown C++ exception");
  }
  return -1;
}

// A connection to the rendezvous store at host:port, serving it when `server`.
c10::intrusive_ptr<c10d::TCPStore> connect_store(const std::string& host, uint16_t port,
                                                 bool server, Millis timeout) {
  c10d::TCPStoreOptions options;
  options.port = port;
  options.isServer = server;
  // Ranks join through keys of their own (see join), which can say who is missing.
  options.waitWorkers = false;
  options.timeout = timeout;
  if (server) return c10::make_intrusive<c10d::TCPStore>(host, options);
  // A client's first exchange with the store has no read timeout: a listener that accepts
  // but never answers (rank 0 frozen, the port another program's) would hold this rank for
  // ever. So the client connects on a thread of its own and is given up on after the
  // timeout (plus a little, so that c10d's own connection error wins when there is one).
  // The abandoned thread ends with the process, which is about to fail.
  using Client = c10::intrusive_ptr<c10d::TCPStore>;
  auto connected = std::make_shared<std::promise<Client>>();
  std::future<Client> client = connected->get_future();
  std::thread([host, options, connected]() {
    try {
      connected->set_value(c10::make_intrusive<c10d::TCPStore>(host, options));
    } catch (...) {
      connected->set_exception(std::current_exception());
    }
  }).detach();
  if (client.wait_for(timeout + std::chrono::seconds(2)) != std::future_status::ready) {
    throw std::runtime_error("something listens at " + host + ":" + std::to_string(port) +
                             " but does not answer as a store (a frozen rank 0, or another "
                             "program's port)");
  }
  return client.get();
}

// The collective `bucketed` runs.
enum class Op { Sum, Average, Broadcast };

}  // namespace

struct caldpo_pg {
  int rank = 0;
  int world = 1;
  Millis timeout{0};
  std::string host;
  uint16_t port = 0;
  // Prefix of every key this group writes, so that a restarted job ignores stale keys.
  std::string prefix;
  c10::intrusive_ptr<c10d::TCPStore> store;
  // A second connection for reads and marks from the trainer's thread, and a third owned by
  // the heartbeat thread. Both wait at most kProbeTimeout, where the first waits a whole
  // timeout for the store to come up, and the heartbeat's never queues behind the trainer's
  // requests.
  c10::intrusive_ptr<c10d::TCPStore> probe;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::thread heartbeat;
  std::mutex mutex;
  std::condition_variable wake;
  bool stopping = false;

  // Waits for a collective on the host, at most `timeout`; a failure or a timeout becomes an
  // exception. The collectives themselves run under the backend's own timeout (options.timeout
  // is left unset), which for NCCL is a minute longer, so that this wait, and the diagnosis
  // that names the missing rank, always come first.
  void wait(const c10::intrusive_ptr<c10d::Work>& work) {
    if (!work->wait(timeout)) {
      throw std::runtime_error("collective did not finish within the timeout");
    }
  }

  // Where collectives run: Gloo reduces on the CPU, NCCL on this rank's GPU. Tensors
  // elsewhere are staged through a bucket there and copied back.
  at::Device device{at::kCPU};

  void start_heartbeat() {
    auto client = connect_store(host, port, false, std::min(timeout, kProbeTimeout));
    heartbeat = std::thread([this, client]() {
      int64_t beat = 0;
      std::unique_lock<std::mutex> lock(mutex);
      while (!stopping) {
        lock.unlock();
        try {
          ++beat;
          std::string value = std::to_string(beat);
          client->set(prefix + "/heartbeat/" + std::to_string(rank),
                      std::vector<uint8_t>(value.begin(), value.end()));
        } catch (...) {
          // A store that is gone cannot be told; one that hiccuped is told next second.
        }
        lock.lock();
        wake.wait_for(lock, std::chrono::seconds(1), [this] { return stopping; });
      }
    });
  }

  // Marks this rank as joined, then waits until every rank has, naming the missing ones
  // when the timeout passes.
  void join() {
    std::string mine = prefix + "/joined/" + std::to_string(rank);
    probe->set(mine, std::vector<uint8_t>{'1'});
    std::vector<std::string> keys;
    for (int other = 0; other < world; ++other) {
      keys.push_back(prefix + "/joined/" + std::to_string(other));
    }
    auto deadline = std::chrono::steady_clock::now() + timeout;
    // One request checks every key, so that each rank sends one request a poll however large
    // the world; the keys are read one by one only to name the missing ranks.
    while (!probe->check(keys)) {
      if (std::chrono::steady_clock::now() > deadline) {
        std::string missing;
        for (int other = 0; other < world; ++other) {
          if (!probe->check({keys[other]})) {
            missing += (missing.empty() ? "" : ", ") + std::to_string(other);
          }
        }
        throw std::runtime_error("ranks that never joined: " + missing);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  ~caldpo_pg() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    wake.notify_all();
    if (heartbeat.joinable()) heartbeat.join();
    backend.reset();
  }
};

// Tensors are reduced in buckets of at most `bucket_bytes` (one tensor larger than that is a
// bucket of its own), each flattened into one contiguous buffer on the collective's device.
// A broadcast comes from rank `root`.
static void bucketed(caldpo_pg* pg, at::Tensor** tensors, size_t count, Op op, int root,
                     int64_t bucket_bytes) {
  size_t start = 0;
  while (start < count) {
    const at::Tensor& first = *tensors[start];
    size_t end = start + 1;
    int64_t bytes = first.numel() * first.element_size();
    while (end < count) {
      const at::Tensor& next = *tensors[end];
      int64_t more = next.numel() * next.element_size();
      if (next.scalar_type() != first.scalar_type() || next.device() != first.device() ||
          bytes + more > bucket_bytes) {
        break;
      }
      bytes += more;
      ++end;
    }
    std::vector<at::Tensor> flat_parts;
    for (size_t i = start; i < end; ++i) flat_parts.push_back(tensors[i]->reshape({-1}));
    at::Tensor flat = at::cat(flat_parts).to(pg->device).contiguous();
    std::vector<at::Tensor> buffers{flat};
    if (op == Op::Broadcast) {
      c10d::BroadcastOptions options;
      options.rootRank = root;
      pg->wait(pg->backend->broadcast(buffers, options));
    } else {
      c10d::AllreduceOptions options;
      options.reduceOp = c10d::ReduceOp::SUM;
      pg->wait(pg->backend->allreduce(buffers, options));
      // Gloo has no average; dividing the summed bucket is exact for a power-of-two world.
      if (op == Op::Average) flat.div_(pg->world);
    }
    int64_t offset = 0;
    for (size_t i = start; i < end; ++i) {
      at::Tensor& target = *tensors[i];
      int64_t n = target.numel();
      target.copy_(flat.narrow(0, offset, n).view(target.sizes()));
      offset += n;
    }
    start = end;
  }
}

extern "C" {

int caldpo_pg_has_nccl() {
#ifdef CALDPO_NCCL
  return 1;
#else
  return 0;
#endif
}

// Rendezvous at host:port and create the backend: NCCL on cuda:`device_index` when
// `device_index` >= 0, else Gloo. `serve`: this rank hosts the store (rank 0, unless a
// launcher such as torchrun already serves it). Keys are written under `prefix`. Returns
// null on failure.
caldpo_pg* caldpo_pg_new(const char* host, uint16_t port, int serve, const char* prefix,
                         int rank, int world, int64_t timeout_ms, int device_index, char* err,
                         size_t err_len) {
  std::unique_ptr<caldpo_pg> pg;
  int status = guarded(err, err_len, [&]() {
    pg = std::make_unique<caldpo_pg>();
    pg->rank = rank;
    pg->world = world;
    pg->timeout = Millis(timeout_ms);
    pg->host = host;
    pg->port = port;
    pg->prefix = prefix;
    if (device_index >= 0) {
      // By default NCCL's watchdog ends the process on a communicator error or timeout,
      // before caldpo can say which rank failed. Mode 2 aborts the communicators and leaves
      // the error to the waiting collective, which reports it. A value the user set is kept.
      // Set before the heartbeat thread starts, since setenv races with readers.
      setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", 0);
    }
    pg->store = connect_store(pg->host, port, serve != 0, pg->timeout);
    // The first connection waited for the store to come up; these two talk to a running
    // one, and a store frozen with rank 0 must not hold a diagnosis for a whole timeout.
    pg->probe = connect_store(pg->host, port, false, std::min(pg->timeout, kProbeTimeout));
    pg->start_heartbeat();
    pg->join();
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(pg->prefix + "/pg", pg->store);
    if (device_index >= 0) {
#ifdef CALDPO_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
      auto options = c10d::ProcessGroupNCCL::Options::create();
      // NCCL's watchdog aborts the communicators when this timeout passes; the host's wait
      // (pg->timeout) must end first, so that the error names the missing rank.
      options->timeout = pg->timeout + std::chrono::seconds(60);
      pg->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world, options);
      pg->device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
#else
      throw std::runtime_error(
          "this caldpo was built without NCCL; build it against the cu130 libtorch variant");
#endif
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(pg->timeout);
      const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
      if (interface != nullptr && *interface != '\0') {
        options->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForInterface(std::string(interface)));
      } else {
        options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      pg->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, options);
    }
  });
  return status == 0 ? pg.release() : nullptr;
}

// Orderly shutdown after a successful run: shuts the backend down, stops the heartbeat and
// closes the stores. After a failed collective the caller must not call this: tearing down a
// backend with work in flight can block. It calls caldpo_pg_abort instead.
void caldpo_pg_free(caldpo_pg* pg) {
  try {
    if (pg->backend) pg->backend->shutdown();
    delete pg;
  } catch (...) {
    // Nothing to recover at the end of a run, and nothing may unwind into Rust.
  }
}

// After a failed collective: aborts the backend's communicators without waiting for the
// work in flight (NCCL kernels would otherwise keep spinning on the GPU until the process
// ends) and leaves the rest to the process's exit.
void caldpo_pg_abort(caldpo_pg* pg) {
  try {
    if (pg->backend) pg->backend->abort();
  } catch (...) {
    // The process is about to exit with the collective's error; this one adds nothing.
  }
}

int caldpo_pg_all_reduce(caldpo_pg* pg, at::Tensor** tensors, size_t count, int average,
                         int64_t bucket_bytes, char* err, size_t err_len) {
  Op op = average ? Op::Average : Op::Sum;
  return guarded(err, err_len, [&]() { bucketed(pg, tensors, count, op, 0, bucket_bytes); });
}

int caldpo_pg_broadcast(caldpo_pg* pg, at::Tensor** tensors, size_t count, int root,
                        int64_t bucket_bytes, char* err, size_t err_len) {
  return guarded(err, err_len,
                 [&]() { bucketed(pg, tensors, count, Op::Broadcast, root, bucket_bytes); });
}

// Gathers `input` from every rank into `output`, shaped [world, *input.shape].
int caldpo_pg_all_gather(caldpo_pg* pg, at::Tensor* input, at::Tensor* output, char* err,
                         size_t err_len) {
  return guarded(err, err_len, [&]() {
    std::vector<at::Tensor> inputs{input->to(pg->device).contiguous()};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < pg->world; ++r) outputs[0].push_back(at::empty_like(inputs[0]));
    c10d::AllgatherOptions options;
    pg->wait(pg->backend->allgather(outputs, inputs, options));
    output->copy_(at::stack(outputs[0]));
  });
}

int caldpo_pg_barrier(caldpo_pg* pg, char* err, size_t err_len) {
  return guarded(err, err_len, [&]() {
    // A one-element all-reduce rather than the backend's barrier: the same code path, with
    // the same timeout and failure reporting, for both backends.
    at::Tensor token = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(pg->device));
    std::vector<at::Tensor> buffers{token};
    c10d::AllreduceOptions options;
    pg->wait(pg->backend->allreduce(buffers, options));
    // Waiting for the copy to the host makes the barrier block the host on NCCL too.
    token.cpu();
  });
}

// Stores `value` under `key` in the rendezvous store.
int caldpo_pg_store_set(caldpo_pg* pg, const char* key, int64_t value, char* err,
                        size_t err_len) {
  return guarded(err, err_len, [&]() {
    std::string text = std::to_string(value);
    pg->probe->set(key, std::vector<uint8_t>(text.begin(), text.end()));
  });
}

// Reads `key`: 1 and *value when present, 0 when absent, -1 when the store is unreachable.
int caldpo_pg_store_get(caldpo_pg* pg, const char* key, int64_t* value, char* err,
                        size_t err_len) {
  int present = 0;
  int status = guarded(err, err_len, [&]() {
    if (!pg->probe->check({key})) return;
    std::vector<uint8_t> bytes = pg->probe->get(key);
    *value = std::stoll(std::string(bytes.begin(), bytes.end()));
    present = 1;
  });
  return status == 0 ? present : -1;
}

}  // extern "C"
