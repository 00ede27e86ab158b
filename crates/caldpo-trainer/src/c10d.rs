//! Safe wrapper over the c10d shim (csrc/c10d_shim.cpp): a libtorch process group and its
//! collectives. Every call blocks until the collective is done, fails, or times out.

use std::cell::Cell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::Tensor;

#[repr(C)]
struct RawGroup {
    _private: [u8; 0],
}

type RawTensor = *mut torch_sys::C_tensor;

extern "C" {
    fn caldpo_pg_has_nccl() -> c_int;
    fn caldpo_pg_new(
        host: *const c_char,
        port: u16,
        serve: c_int,
        prefix: *const c_char,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device_index: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut RawGroup;
    fn caldpo_pg_free(group: *mut RawGroup);
    fn caldpo_pg_abort(group: *mut RawGroup);
    fn caldpo_pg_all_reduce(
        group: *mut RawGroup,
        tensors: *const RawTensor,
        count: usize,
        average: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn caldpo_pg_broadcast(
        group: *mut RawGroup,
        tensors: *const RawTensor,
        count: usize,
        root: c_int,
        bucket_bytes: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn caldpo_pg_all_gather(
        group: *mut RawGroup,
        input: RawTensor,
        output: RawTensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    #[cfg(test)]
    fn caldpo_pg_barrier(group: *mut RawGroup, err: *mut c_char, err_len: usize) -> c_int;
    fn caldpo_pg_store_set(
        group: *mut RawGroup,
        key: *const c_char,
        value: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn caldpo_pg_store_get(
        group: *mut RawGroup,
        key: *const c_char,
        value: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Whether this build can create NCCL process groups (it was built against CUDA libtorch).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { caldpo_pg_has_nccl() != 0 }
}

/// Where and how the ranks meet.
pub struct GroupOptions<'a> {
    pub master_addr: &'a str,
    pub master_port: u16,
    /// Whether this rank hosts the rendezvous store.
    pub serve_store: bool,
    /// Prefix of every key the group writes in the store.
    pub key_prefix: &'a str,
    pub rank: usize,
    pub world_size: usize,
    pub timeout: Duration,
    /// NCCL on this CUDA device, or Gloo (CPU buffers) when `None`.
    pub nccl_device: Option<usize>,
}

/// A c10d process group with its rendezvous store, shut down in order (backend, heartbeat,
/// store) when dropped after a successful run.
pub struct ProcessGroup {
    raw: *mut RawGroup,
    bucket_bytes: i64,
    /// Set when a call failed: the backend is then aborted rather than shut down, since an
    /// orderly teardown with work in flight can block, and the rest is left to the process's
    /// exit.
    broken: Cell<bool>,
}

/// Room for the shim's error text.
const ERROR_CAPACITY: usize = 2048;

fn error_buffer() -> Vec<c_char> {
    vec![0; ERROR_CAPACITY]
}

fn error_text(buffer: &[c_char]) -> String {
    // SAFETY: the buffer is zero-initialised and the shim always NUL-terminates within it.
    unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().trim().to_string()
}

impl ProcessGroup {
    /// Joins the rendezvous (served by this rank when `serve_store`), waits until every rank
    /// has joined, and creates the backend.
    pub fn new(options: &GroupOptions, bucket_bytes: i64) -> Result<ProcessGroup> {
        let host = CString::new(options.master_addr).context("MASTER_ADDR holds a NUL byte")?;
        let prefix = CString::new(options.key_prefix).context("store prefix holds a NUL byte")?;
        let mut err = error_buffer();
        let device = options.nccl_device.map_or(-1, |index| index as c_int);
        // SAFETY: valid C strings and an error buffer of the stated length; the shim catches
        // every C++ exception.
        let raw = unsafe {
            caldpo_pg_new(
                host.as_ptr(),
                options.master_port,
                c_int::from(options.serve_store),
                prefix.as_ptr(),
                options.rank as c_int,
                options.world_size as c_int,
                options.timeout.as_millis() as i64,
                device,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if raw.is_null() {
            bail!("{}", error_text(&err));
        }
        Ok(ProcessGroup { raw, bucket_bytes, broken: Cell::new(false) })
    }

    fn check(&self, status: c_int, err: &[c_char]) -> Result<()> {
        if status != 0 {
            self.broken.set(true);
            bail!("{}", error_text(err));
        }
        Ok(())
    }

    /// Sums (or averages) the tensors across ranks in place, in buckets of at most the
    /// group's bucket size.
    pub fn all_reduce(&self, tensors: &[&Tensor], average: bool) -> Result<()> {
        let raw: Vec<RawTensor> = tensors.iter().map(|t| t.as_ptr() as RawTensor).collect();
        let mut err = error_buffer();
        // SAFETY: the pointers are live tch tensors borrowed for the call.
        let status = unsafe {
            caldpo_pg_all_reduce(
                self.raw,
                raw.as_ptr(),
                raw.len(),
                c_int::from(average),
                self.bucket_bytes,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        self.check(status, &err)
    }

    /// Overwrites the tensors with rank `root`'s values.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        let raw: Vec<RawTensor> = tensors.iter().map(|t| t.as_ptr() as RawTensor).collect();
        let mut err = error_buffer();
        // SAFETY: as in all_reduce.
        let status = unsafe {
            caldpo_pg_broadcast(
                self.raw,
                raw.as_ptr(),
                raw.len(),
                root as c_int,
                self.bucket_bytes,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        self.check(status, &err)
    }

    /// Every rank's `input` (same shape on all), stacked as [world, *shape].
    pub fn all_gather(&self, input: &Tensor, world_size: usize) -> Result<Tensor> {
        let mut shape = vec![world_size as i64];
        shape.extend(input.size());
        let output = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        let mut err = error_buffer();
        // SAFETY: as in all_reduce; `output` has the shape the shim copies into.
        let status = unsafe {
            caldpo_pg_all_gather(
                self.raw,
                input.as_ptr() as RawTensor,
                output.as_ptr() as RawTensor,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        self.check(status, &err)?;
        Ok(output)
    }

    /// Waits until every rank has arrived. The training loop needs no bare barrier: where
    /// ranks wait for rank 0, they also learn whether its work failed (`Comm::run_where`).
    #[cfg(test)]
    pub fn barrier(&self) -> Result<()> {
        let mut err = error_buffer();
        // SAFETY: a live group and an error buffer of the stated length.
        let status = unsafe { caldpo_pg_barrier(self.raw, err.as_mut_ptr(), err.len()) };
        self.check(status, &err)
    }

    /// Writes an integer into the rendezvous store.
    pub fn store_set(&self, key: &str, value: i64) -> Result<()> {
        let key = CString::new(key).context("store key holds a NUL byte")?;
        let mut err = error_buffer();
        // SAFETY: as in barrier, with a valid C string.
        let status = unsafe {
            caldpo_pg_store_set(self.raw, key.as_ptr(), value, err.as_mut_ptr(), err.len())
        };
        self.check(status, &err)
    }

    /// Reads an integer from the rendezvous store: `Ok(None)` when the key is absent, an
    /// error when the store (hosted by rank 0) cannot be reached.
    pub fn store_get(&self, key: &str) -> Result<Option<i64>> {
        let key = CString::new(key).context("store key holds a NUL byte")?;
        let mut value = 0;
        let mut err = error_buffer();
        // SAFETY: as in store_set; `value` outlives the call.
        let status = unsafe {
            caldpo_pg_store_get(self.raw, key.as_ptr(), &mut value, err.as_mut_ptr(), err.len())
        };
        match status {
            1 => Ok(Some(value)),
            0 => Ok(None),
            _ => {
                self.broken.set(true);
                bail!("{}", error_text(&err))
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from caldpo_pg_new; it is either freed exactly once or aborted
        // and never used again.
        unsafe {
            if self.broken.get() {
                caldpo_pg_abort(self.raw);
            } else {
                caldpo_pg_free(self.raw);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// Runs `body` as ranks 0 and 1 of a Gloo group, one thread each, with 8-byte buckets so
    /// that every tensor of more than two f32 travels in several.
    fn two_ranks(body: fn(&ProcessGroup, usize) -> Vec<f32>) -> [Vec<f32>; 2] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let rank = move |rank: usize| {
            std::thread::spawn(move || {
                let options = GroupOptions {
                    master_addr: "127.0.0.1",
                    master_port: port,
                    serve_store: rank == 0,
                    key_prefix: "test",
                    rank,
                    world_size: 2,
                    timeout: Duration::from_secs(30),
                    nccl_device: None,
                };
                let group = ProcessGroup::new(&options, 8).unwrap();
                let result = body(&group, rank);
                group.barrier().unwrap();
                result
            })
        };
        let (first, second) = (rank(0), rank(1));
        [first.join().unwrap(), second.join().unwrap()]
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(tensor.flatten(0, -1)).unwrap()
    }

    #[test]
    fn all_reduce_sums_and_averages_across_buckets() {
        // Rank r holds [r + 1, 2(r + 1), 3(r + 1)] and [10(r + 1)]: sums [3, 6, 9] and [30].
        let results = two_ranks(|group, rank| {
            let scale = (rank + 1) as f64;
            let a = Tensor::from_slice(&[1f32, 2.0, 3.0]) * scale;
            let b = Tensor::from_slice(&[10f32]) * scale;
            group.all_reduce(&[&a, &b], false).unwrap();
            let c = Tensor::from_slice(&[1f32, 2.0, 3.0]) * scale;
            group.all_reduce(&[&c], true).unwrap();
            [values(&a), values(&b), values(&c)].concat()
        });
        let expected = vec![3.0, 6.0, 9.0, 30.0, 1.5, 3.0, 4.5];
        assert_eq!(results, [expected.clone(), expected]);
    }

    #[test]
    fn broadcast_and_all_gather() {
        let results = two_ranks(|group, rank| {
            let weights = Tensor::full([2, 3], rank as f64 + 1.0, (Kind::Float, Device::Cpu));
            group.broadcast(&[&weights], 1).unwrap();
            let mine = Tensor::from_slice(&[rank as f32, 10.0 * rank as f32]);
            let gathered = group.all_gather(&mine, 2).unwrap();
            assert_eq!(gathered.size(), [2, 2]);
            [values(&weights), values(&gathered)].concat()
        });
        let expected = vec![2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 1.0, 10.0];
        assert_eq!(results, [expected.clone(), expected]);
    }

    #[test]
    fn the_store_holds_integers_and_reports_absent_keys() {
        let results = two_ranks(|group, rank| {
            group.store_set(&format!("test/value/{rank}"), 40 + rank as i64).unwrap();
            group.barrier().unwrap();
            let other = group.store_get(&format!("test/value/{}", 1 - rank)).unwrap();
            let absent = group.store_get("test/never-written").unwrap();
            vec![other.unwrap() as f32, f32::from(u8::from(absent.is_none()))]
        });
        assert_eq!(results, [vec![41.0, 1.0], vec![40.0, 1.0]]);
    }
}
