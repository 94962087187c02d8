//! Per-sequence key/value cache, kept outside the model and passed in on every forward call.
//!
//! Storage grows in steps of [`STEP`] positions and is written with slice updates, so a decode
//! step never copies the whole history; `trim` rewinds (prompt-cache reuse, speculative paths).

use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

/// Positions added whenever the cache runs out of room.
pub const STEP: i32 = 256;

/// `dst[:, :, at:at+T, :] = src` as one SliceUpdate node. mlx-rs's indexed assignment adds two
/// reshapes around it (it strips and restores leading unit dimensions), which every decode step
/// would pay per layer.
fn write_positions(dst: &Array, src: &Array, at: i32) -> Result<Array, mlx_rs::error::Exception> {
    write_block(dst, src, 0, at)
}

/// `dst[row:row+R, :, at:at+T, :] = src` (`src` is `[R, H, T, D]`) as one SliceUpdate node.
fn write_block(dst: &Array, src: &Array, row: i32, at: i32) -> Result<Array, mlx_rs::error::Exception> {
    let (r, t) = (src.shape()[0], src.shape()[2]);
    let shape = dst.shape();
    let start = [row, 0, at, 0];
    let stop = [row + r, shape[1], at + t, shape[3]];
    let strides = [1, 1, 1, 1];
    crate::ffi::array_op(|res, stream| {
        // SAFETY: mlx-c's slice_update with arrays and bounds that outlive the call.
        unsafe {
            mlx_sys::mlx_slice_update(
                res,
                dst.as_ptr(),
                src.as_ptr(),
                start.as_ptr(),
                4,
                stop.as_ptr(),
                4,
                strides.as_ptr(),
                4,
                stream,
            )
        }
    })
    .ok_or_else(|| {
        mlx_rs::error::Exception::custom(format!(
            "KV cache update of {:?} into {shape:?} at row {row}, position {at} failed",
            src.shape()
        ))
    })
}

/// One attention layer's cache for one sequence (batch size 1 or a fixed batch).
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    keys: Option<Array>,
    values: Option<Array>,
    offset: i32,
    /// Present while `keys` and `values` are storage this cache made for the fused decode step
    /// ([`Self::fused_storage`]), which writes into them in place: full, contiguous arrays no
    /// other cache holds unless it holds a clone of this token too. Clones of the cache and the
    /// views handed out ([`Self::prefix_copy`], [`Self::compact`]) clone the token, so a shared
    /// buffer is never written in place; MLX's own writes drop it.
    owned: Option<std::sync::Arc<()>>,
}

impl LayerCache {
    /// Positions filled so far.
    pub fn offset(&self) -> i32 {
        self.offset
    }

    /// Appends `k`, `v` (`[B, kv_heads, T, head_dim]`) and returns everything cached so far.
    pub fn update_and_fetch(&mut self, k: &Array, v: &Array) -> Result<(Array, Array), mlx_rs::error::Exception> {
        let t = k.shape()[2];
        let needed = self.offset + t;
        let capacity = self.keys.as_ref().map_or(0, |a| a.shape()[2]);
        if needed > capacity {
            // The old storage is kept only up to `offset` (what lies past it is stale), so the
            // new room is counted from there: enough for `needed`, rounded up to a STEP. (It was
            // counted from the old capacity, which left a cache with spare room, such as a
            // prompt-cache prefix copy, short of `needed`: 153 kept + 256 new < 153 + 297.)
            let grow = (needed + STEP - 1) / STEP * STEP - self.offset;
            let (b, h, d) = (k.shape()[0], k.shape()[1], k.shape()[3]);
            let vd = v.shape()[3];
            let new_k = ops::zeros_dtype(&[b, h, grow, d], k.dtype())?;
            let new_v = ops::zeros_dtype(&[b, h, grow, vd], v.dtype())?;
            self.keys = Some(match self.keys.take() {
                Some(old) => ops::concatenate(&[old.try_index((.., .., ..self.offset, ..))?, new_k], 2)?,
                None => new_k,
            });
            self.values = Some(match self.values.take() {
                Some(old) => ops::concatenate(&[old.try_index((.., .., ..self.offset, ..))?, new_v], 2)?,
                None => new_v,
            });
        }
        let (keys, values) = (self.keys.as_mut().expect("allocated"), self.values.as_mut().expect("allocated"));
        *keys = write_positions(keys, k, self.offset)?;
        *values = write_positions(values, v, self.offset)?;
        self.offset = needed;
        self.owned = None;
        Ok((keys.try_index((.., .., ..needed, ..))?, values.try_index((.., .., ..needed, ..))?))
    }

    /// Forgets the last `n` positions (at most all of them); returns how many were dropped.
    pub fn trim(&mut self, n: i32) -> i32 {
        let n = n.clamp(0, self.offset);
        self.offset -= n;
        n
    }

    /// Keys and values (`[1, kv_heads, capacity, head_dim]`) the fused decode step may write
    /// position `offset` of in place: this cache's own full arrays, with room for one more
    /// position. Storage that is shared, a view, or full is first copied (the positions so far)
    /// into new storage rounded up to a [`STEP`], as MLX's copy-on-write update would, and
    /// evaluated (see [`Self::prepare_fused_storage`] to evaluate several layers' at once).
    pub(crate) fn fused_storage(
        &mut self,
        kv_heads: i32,
        head_dim: i32,
        dtype: mlx_rs::Dtype,
    ) -> Result<(Array, Array), mlx_rs::error::Exception> {
        if let Some(fresh) = self.prepare_fused_storage(kv_heads, head_dim, dtype, 0)? {
            // Evaluated now: the kernel that writes into them must get their final buffers.
            mlx_rs::transforms::eval(fresh.iter())?;
        }
        Ok((self.keys.clone().expect("made above"), self.values.clone().expect("made above")))
    }

    /// Makes the storage [`Self::fused_storage`] hands out where the cache's own does not fit,
    /// and returns the new arrays, not yet evaluated: the caller evaluates them (a sequence's
    /// first fused step makes every layer's, and one wait for all of them costs the host far
    /// less than one per layer). The storage holds at least `min_capacity` positions: one
    /// launch of the fused kernel runs every layer with the first layer's capacity, so a
    /// sequence's layers are given one.
    pub(crate) fn prepare_fused_storage(
        &mut self,
        kv_heads: i32,
        head_dim: i32,
        dtype: mlx_rs::Dtype,
        min_capacity: i32,
    ) -> Result<Option<[Array; 2]>, mlx_rs::error::Exception> {
        // A view (a prefix copy's slice of a longer buffer) is strided: the kernel indexes rows
        // by the array's own capacity, so only row-contiguous storage fits.
        let fits = |a: &Option<Array>| {
            a.as_ref().is_some_and(|a| {
                let cap = a.shape()[2];
                let contiguous = a.strides()[1..] == [(cap * head_dim) as usize, head_dim as usize, 1];
                a.shape() == [1, kv_heads, cap, head_dim]
                    && cap > self.offset
                    && cap >= min_capacity
                    && a.dtype() == dtype
                    && contiguous
            })
        };
        let own = self.owned.as_ref().is_some_and(|t| std::sync::Arc::strong_count(t) == 1);
        if own && fits(&self.keys) && fits(&self.values) {
            return Ok(None);
        }
        let room = ((self.offset + 1 + STEP - 1) / STEP * STEP).max(min_capacity);
        // The positions so far, then zeros up to `room` (all zeros for an empty cache).
        let fresh = |old: &Option<Array>| -> Result<Array, mlx_rs::error::Exception> {
            let tail = ops::zeros_dtype(&[1, kv_heads, room - self.offset, head_dim], dtype)?;
            match old {
                Some(old) if self.offset > 0 => {
                    ops::concatenate(&[old.try_index((.., .., ..self.offset, ..))?.as_dtype(dtype)?, tail], 2)
                }
                _ => Ok(tail),
            }
        };
        let (k, v) = (fresh(&self.keys)?, fresh(&self.values)?);
        self.keys = Some(k.clone());
        self.values = Some(v.clone());
        self.owned = Some(std::sync::Arc::new(()));
        Ok(Some([k, v]))
    }

    /// Positions the storage the fused kernel writes holds (0 before it has any).
    pub(crate) fn fused_capacity(&self) -> i32 {
        self.keys.as_ref().map_or(0, |k| if k.ndim() == 4 { k.shape()[2] } else { 0 })
    }

    /// One more position filled (by the fused decode step, in place).
    pub(crate) fn advance_in_place(&mut self) {
        self.offset += 1;
    }

    /// Device bytes held by the storage.
    pub fn nbytes(&self) -> usize {
        self.keys.as_ref().map_or(0, |a| a.nbytes()) + self.values.as_ref().map_or(0, |a| a.nbytes())
    }

    /// This cache in storage of its own. A view into a larger array (a row split off a stacked
    /// batch, see [`BatchCache::split`]) keeps that whole array alive while it reports only its
    /// own size; a copy holds what it reports. Spare room up to the next [`STEP`] boundary is
    /// kept where there is some, as [`Self::prefix_copy`] keeps it; a cache that already owns
    /// exactly that storage is not copied. Evaluated here, so the view is released at once.
    pub fn compact(&self) -> Result<LayerCache, mlx_rs::error::Exception> {
        let own = |a: &Option<Array>| -> Result<Option<Array>, mlx_rs::error::Exception> {
            match a {
                Some(a) if self.offset > 0 => {
                    let room = ((self.offset / STEP) + 1) * STEP;
                    // `contiguous` copies whenever the source's buffer is larger than the result.
                    Ok(Some(a.try_index((.., .., ..room.min(a.shape()[2]), ..))?.contiguous()?))
                }
                _ => Ok(None),
            }
        };
        let out = LayerCache {
            keys: own(&self.keys)?,
            values: own(&self.values)?,
            offset: self.offset,
            owned: self.owned.clone(),
        };
        mlx_rs::transforms::eval([out.keys.as_ref(), out.values.as_ref()].into_iter().flatten())?;
        Ok(out)
    }

    /// A cache holding the first `len` positions of this one. MLX arrays are immutable, so
    /// writing to the copy never disturbs this cache. The copy keeps this cache's spare room
    /// past `len` (up to the next [`STEP`] boundary), so its next token needs no regrowth.
    pub fn prefix_copy(&self, len: i32) -> Result<LayerCache, mlx_rs::error::Exception> {
        let len = len.min(self.offset);
        let slice = |a: &Option<Array>| -> Result<Option<Array>, mlx_rs::error::Exception> {
            match a {
                Some(a) if len > 0 => {
                    let room = ((len / STEP) + 1) * STEP;
                    Ok(Some(a.try_index((.., .., ..room.min(a.shape()[2]), ..))?))
                }
                _ => Ok(None),
            }
        };
        Ok(LayerCache {
            keys: slice(&self.keys)?,
            values: slice(&self.values)?,
            offset: len.max(0),
            owned: self.owned.clone(),
        })
    }
}

/// The caches of every layer of one sequence.
#[derive(Debug, Clone, Default)]
pub struct SequenceCache {
    /// One entry per decoder block.
    pub layers: Vec<LayerCache>,
    /// Scratch space and barrier counters of the fused decode step (`crate::models::fused`),
    /// written in place: a clone shares it, and whichever then decodes makes its own.
    pub(crate) fused_work: Option<std::sync::Arc<crate::models::fused::Workspace>>,
}

impl SequenceCache {
    /// An empty cache for a model with `n` layers.
    pub fn new(n: usize) -> Self {
        SequenceCache { layers: vec![LayerCache::default(); n], fused_work: None }
    }

    /// Positions cached (the same in every layer).
    pub fn offset(&self) -> i32 {
        self.layers.first().map_or(0, LayerCache::offset)
    }

    /// Rewinds every layer by `n` positions.
    pub fn trim(&mut self, n: i32) {
        for l in &mut self.layers {
            l.trim(n);
        }
    }

    /// Device bytes held.
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(LayerCache::nbytes).sum()
    }

    /// Row `row`'s first `len` positions of a cache that holds several sequences side by side
    /// (a prefill of several prompts, each starting at position 0), as that sequence's own
    /// cache: views, no copy (a later write copies, as MLX's copy-on-write does).
    pub fn row(&self, row: i32, len: i32) -> Result<SequenceCache, mlx_rs::error::Exception> {
        let view = |a: &Option<Array>| a.as_ref().map(|a| a.try_index((row..row + 1, .., ..len, ..))).transpose();
        let layers = self
            .layers
            .iter()
            .map(|l| Ok(LayerCache { keys: view(&l.keys)?, values: view(&l.values)?, offset: len, owned: None }))
            .collect::<Result<_, mlx_rs::error::Exception>>()?;
        Ok(SequenceCache { layers, fused_work: None })
    }

    /// Evaluates the cached keys and values (the end of a prefill chunk).
    pub fn eval(&self) -> Result<(), mlx_rs::error::Exception> {
        let arrays: Vec<&Array> =
            self.layers.iter().flat_map(|l| [l.keys.as_ref(), l.values.as_ref()]).flatten().collect();
        mlx_rs::transforms::eval(arrays)
    }

    /// Every layer [`LayerCache::compact`]ed: storage of its own, exactly as large as
    /// [`Self::nbytes`] then reports.
    pub fn compact(&self) -> Result<SequenceCache, mlx_rs::error::Exception> {
        Ok(SequenceCache {
            layers: self.layers.iter().map(LayerCache::compact).collect::<Result<_, _>>()?,
            fused_work: None,
        })
    }

    /// The first `len` positions, as an independent cache.
    pub fn prefix_copy(&self, len: i32) -> Result<SequenceCache, mlx_rs::error::Exception> {
        Ok(SequenceCache {
            layers: self.layers.iter().map(|l| l.prefix_copy(len)).collect::<Result<_, _>>()?,
            fused_work: None,
        })
    }
}

/// The caches of several sequences decoded together, stacked into one `[B, kv_heads, cap,
/// head_dim]` array per layer so that a batched step's attention is one set of operations
/// whatever `B` is.
///
/// Rows are left-padded to a common length: every row's next position is the same column
/// `cur`, one SliceUpdate writes all rows, and a mask hides each row's padding. Per-row RoPE
/// offsets are `cur - pad[i]`. The stack is built when the set of sequences changes and split
/// back into per-sequence caches when it changes again, so joins and leaves cost one copy each
/// while steady decoding costs nothing extra.
#[derive(Debug)]
pub struct BatchCache {
    /// Ids of the member sequences, in row order.
    pub members: Vec<u64>,
    keys: Vec<Array>,
    values: Vec<Array>,
    pad: Vec<i32>,
    /// `pad` as an array (`[B]` int32), made once per stack: each row's first live column, for
    /// the padded-attention kernel and the mask.
    starts: Array,
    cur: i32,
    /// The fused decode kernel's scratch for this batch ([`crate::models::fused`]).
    pub(crate) fused_work: Option<std::sync::Arc<crate::models::fused::Workspace>>,
    /// Members that ended and took their caches ([`BatchCache::detach`]): their rows stay in
    /// the stack until the next step keeps the others, and no cache is handed back for them.
    departed: Vec<u64>,
}

impl BatchCache {
    /// Stacks `rows` (each with at least one cached position): one zeroed stack per layer's
    /// keys and values, each row's positions written into it at its padding. That is a fill and
    /// one copy per row on the device, where joining padded pieces was five launches per row and
    /// the join (session 17, run 2: 8 rows took 146 ms to stack on an H100, 7 rows 100 ms, in
    /// steps that otherwise take 1.3 ms to build).
    pub fn build(members: Vec<u64>, rows: &[&SequenceCache]) -> Result<Self, mlx_rs::error::Exception> {
        let lens: Vec<i32> = rows.iter().map(|r| r.offset()).collect();
        let cur = lens.iter().copied().max().unwrap_or(0);
        let pad: Vec<i32> = lens.iter().map(|l| cur - l).collect();
        let cap = (cur / STEP + 1) * STEP;
        let layers = rows.first().map_or(0, |r| r.layers.len());
        let b = rows.len() as i32;
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for l in 0..layers {
            let stack = |pick: &dyn Fn(&LayerCache) -> &Option<Array>| -> Result<Array, mlx_rs::error::Exception> {
                let mut out: Option<Array> = None;
                for (r, row) in rows.iter().enumerate() {
                    let a = pick(&row.layers[l]).as_ref().ok_or_else(|| {
                        mlx_rs::error::Exception::custom("a sequence joins a batch only after its prompt is cached")
                    })?;
                    let stack = match out.take() {
                        Some(s) => s,
                        None => ops::zeros_dtype(&[b, a.shape()[1], cap, a.shape()[3]], a.dtype())?,
                    };
                    let live = a.try_index((.., .., ..lens[r], ..))?;
                    out = Some(write_block(&stack, &live, r as i32, pad[r])?);
                }
                out.ok_or_else(|| mlx_rs::error::Exception::custom("a batch needs at least one row"))
            };
            keys.push(stack(&|c: &LayerCache| &c.keys)?);
            values.push(stack(&|c: &LayerCache| &c.values)?);
        }
        let starts = Array::from_slice(&pad, &[pad.len() as i32]);
        Ok(BatchCache { members, keys, values, pad, starts, cur, fused_work: None, departed: Vec::new() })
    }

    /// Member `id`'s cache as it stands (views of the stack), for a sequence that ended: the
    /// batch stays as it is for the others until their next step ([`BatchCache::retain`]).
    pub fn detach(&mut self, id: u64) -> Result<Option<SequenceCache>, mlx_rs::error::Exception> {
        let Some(i) = self.members.iter().position(|&m| m == id) else { return Ok(None) };
        if self.departed.contains(&id) {
            return Ok(None);
        }
        self.departed.push(id);
        Ok(Some(self.row_cache(i)?))
    }

    /// Whether every member has ended (the stack serves no one).
    pub fn deserted(&self) -> bool {
        self.members.iter().all(|m| self.departed.contains(m))
    }

    /// Keeps only the members `keep` (in the batch's order), gathering their rows into a new
    /// stack (one gather per layer's keys and values, no restacking); the others leave with
    /// their own caches (views of the old stack, which is no longer written). `None`, with the
    /// batch unchanged, where `keep` is not an ordered subset of the members.
    pub fn retain(&mut self, keep: &[u64]) -> Result<Option<Vec<(u64, SequenceCache)>>, mlx_rs::error::Exception> {
        let mut idx = Vec::with_capacity(keep.len());
        let mut next = 0;
        for id in keep {
            match self.members[next..].iter().position(|m| m == id) {
                Some(at) => {
                    idx.push((next + at) as i32);
                    next += at + 1;
                }
                None => return Ok(None),
            }
        }
        if keep.is_empty() {
            return Ok(None);
        }
        let leaving: Vec<(u64, SequenceCache)> = (0..self.members.len())
            .filter(|&i| !idx.contains(&(i as i32)) && !self.departed.contains(&self.members[i]))
            .map(|i| Ok((self.members[i], self.row_cache(i)?)))
            .collect::<Result<_, mlx_rs::error::Exception>>()?;
        let rows = Array::from_slice(&idx, &[idx.len() as i32]);
        for a in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *a = a.take_axis(&rows, 0)?;
        }
        self.pad = idx.iter().map(|&i| self.pad[i as usize]).collect();
        self.starts = Array::from_slice(&self.pad, &[self.pad.len() as i32]);
        self.members = keep.to_vec();
        self.departed.retain(|d| keep.contains(d));
        Ok(Some(leaving))
    }

    /// Member `i`'s own cache: views of the stacked arrays (no copy).
    fn row_cache(&self, i: usize) -> Result<SequenceCache, mlx_rs::error::Exception> {
        let (r, pad) = (i as i32, self.pad[i]);
        let mut layers = Vec::with_capacity(self.keys.len());
        for l in 0..self.keys.len() {
            let take = |a: &Array| a.try_index((r..r + 1, .., pad..self.cur, ..));
            layers.push(LayerCache {
                keys: Some(take(&self.keys[l])?),
                values: Some(take(&self.values[l])?),
                offset: self.cur - pad,
                owned: None,
            });
        }
        Ok(SequenceCache { layers, fused_work: None })
    }

    /// Positions already cached per row (RoPE offsets of this step's tokens), `[B]` int32.
    pub fn offsets(&self) -> Array {
        let v: Vec<i32> = self.pad.iter().map(|p| self.cur - p).collect();
        Array::from_slice(&v, &[v.len() as i32])
    }

    /// Which of the `cur + 1` columns each row may attend to, `[B, 1, 1, cur + 1]` bool; `None`
    /// when no row is padded (then attention needs no mask, and on a GPU takes its fused
    /// kernels, which refuse an array mask).
    pub fn mask(&self) -> Result<Option<Array>, mlx_rs::error::Exception> {
        if !self.padded() {
            return Ok(None);
        }
        let b = self.pad.len() as i32;
        let cols = ops::arange::<_, i32>(None, self.cur + 1, None)?.reshape(&[1, 1, 1, self.cur + 1])?;
        Ok(Some(ops::ge(&cols, &self.starts.reshape(&[b, 1, 1, 1])?)?))
    }

    /// Whether some row is padded (attention then needs a mask or the padded kernel).
    pub fn padded(&self) -> bool {
        self.pad.iter().any(|&p| p > 0)
    }

    /// Each row's first live column, `[B]` int32 (its padding).
    pub fn starts(&self) -> &Array {
        &self.starts
    }

    /// Writes this step's keys and values (`[B, kv_heads, 1, head_dim]`) of `layer` at column
    /// `cur` and returns the filled columns.
    pub fn update_and_fetch(
        &mut self,
        layer: usize,
        k: &Array,
        v: &Array,
    ) -> Result<(Array, Array), mlx_rs::error::Exception> {
        self.update(layer, k, v)?;
        let n = self.cur + 1;
        Ok((self.keys[layer].try_index((.., .., ..n, ..))?, self.values[layer].try_index((.., .., ..n, ..))?))
    }

    /// Writes this step's keys and values of `layer` at column `cur` and returns the layer's
    /// whole storage, `[B, kv_heads, capacity, head_dim]` each (columns past `cur` unused).
    pub fn update(&mut self, layer: usize, k: &Array, v: &Array) -> Result<(Array, Array), mlx_rs::error::Exception> {
        self.make_room(layer)?;
        self.keys[layer] = write_positions(&self.keys[layer], k, self.cur)?;
        self.values[layer] = write_positions(&self.values[layer], v, self.cur)?;
        Ok((self.keys[layer].clone(), self.values[layer].clone()))
    }

    /// Layer `layer`'s whole storage with room for column `cur`, for a step that writes that
    /// column in place (the fused decode kernel). The stack is never shared: it is made fresh
    /// when the batch is built or grows, MLX's writes replace it, and [`BatchCache::split`] ends
    /// the batch.
    pub(crate) fn storage(&mut self, layer: usize) -> Result<(Array, Array), mlx_rs::error::Exception> {
        self.make_room(layer)?;
        Ok((self.keys[layer].clone(), self.values[layer].clone()))
    }

    /// The column this step writes.
    pub(crate) fn column(&self) -> i32 {
        self.cur
    }

    fn make_room(&mut self, layer: usize) -> Result<(), mlx_rs::error::Exception> {
        if self.cur + 1 > self.keys[layer].shape()[2] {
            let grow = |a: &Array| -> Result<Array, mlx_rs::error::Exception> {
                let s = a.shape();
                ops::concatenate(&[a.clone(), ops::zeros_dtype(&[s[0], s[1], STEP, s[3]], a.dtype())?], 2)
            };
            self.keys[layer] = grow(&self.keys[layer])?;
            self.values[layer] = grow(&self.values[layer])?;
        }
        Ok(())
    }

    /// Device bytes held by the stacked keys and values.
    pub fn nbytes(&self) -> usize {
        self.keys.iter().chain(&self.values).map(Array::nbytes).sum()
    }

    /// Moves to the next column, once every layer has written this step.
    pub fn advance(&mut self) {
        self.cur += 1;
    }

    /// Gives each member its own cache back (views of the stacked arrays, no copy); members that
    /// departed get none.
    pub fn split(self) -> Result<Vec<(u64, SequenceCache)>, mlx_rs::error::Exception> {
        (0..self.members.len())
            .filter(|&i| !self.departed.contains(&self.members[i]))
            .map(|i| Ok((self.members[i], self.row_cache(i)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The storage the fused decode step writes in place is this cache's alone: made fresh
    /// (with the positions so far) unless the cache already owns it with room for one more; a
    /// clone or a prefix copy makes the next writer copy, and MLX's own write gives it up.
    #[test]
    fn fused_storage_is_never_shared() {
        let ptr = |a: &Array| {
            a.eval().unwrap();
            // SAFETY: an evaluated array.
            unsafe { mlx_sys::mlx_array_data_float32(a.as_ptr()) as usize }
        };
        let mut c = LayerCache::default();
        c.update_and_fetch(&positions(3, 0.0), &positions(3, 10.0)).unwrap();
        let (k, v) = c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap();
        assert_eq!(k.shape(), &[1, 1, STEP, 1]);
        assert_eq!(values(&k)[..3], [0.0, 1.0, 2.0]);
        assert_eq!(values(&v)[..3], [10.0, 11.0, 12.0]);
        let own = ptr(&k);
        c.advance_in_place();
        assert_eq!(c.offset(), 4);
        // Owned, with room: the same buffer again.
        assert_eq!(ptr(&c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap().0), own);
        // A clone shares it: the first to write copies, and the other is then its sole holder.
        let mut twin = c.clone();
        assert_ne!(ptr(&c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap().0), own);
        assert_eq!(ptr(&twin.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap().0), own);
        // A prefix copy shares it too.
        let own = ptr(&c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap().0);
        let mut prefix = c.prefix_copy(2).unwrap();
        assert_ne!(ptr(&c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap().0), own);
        let (pk, _) = prefix.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap();
        assert_eq!(values(&pk)[..2], [0.0, 1.0]);
        // A prefix copy of a two-head cache is a strided view: never written in place.
        let heads = |t: i32| ops::broadcast_to(positions(t, 0.0), &[1, 2, t, 1]).unwrap();
        let mut wide = LayerCache::default();
        wide.update_and_fetch(&heads(300), &heads(300)).unwrap();
        wide.fused_storage(2, 1, mlx_rs::Dtype::Float32).unwrap();
        let mut view = wide.prefix_copy(10).unwrap();
        drop(wide);
        let (vk, _) = view.fused_storage(2, 1, mlx_rs::Dtype::Float32).unwrap();
        assert_eq!(vk.shape(), &[1, 2, STEP, 1]);
        assert_eq!(vk.strides(), &[2 * STEP as usize, STEP as usize, 1, 1]);
        assert_eq!(values(&vk)[STEP as usize..STEP as usize + 3], [0.0, 1.0, 2.0]);
        // MLX's own write gives up ownership; full storage is regrown.
        c.update_and_fetch(&positions(1, 5.0), &positions(1, 5.0)).unwrap();
        assert!(c.owned.is_none());
        let mut full = LayerCache::default();
        full.update_and_fetch(&positions(STEP, 0.0), &positions(STEP, 0.0)).unwrap();
        let (k, _) = full.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap();
        assert_eq!(k.shape(), &[1, 1, 2 * STEP, 1]);
        assert_eq!(values(&k)[STEP as usize - 1], (STEP - 1) as f32);
    }

    #[test]
    fn fused_storage_takes_a_capacity_asked_for_and_keeps_the_positions() {
        // A layer whose storage holds STEP positions, asked for as many as another layer's 2 * STEP.
        let mut c = LayerCache::default();
        c.update_and_fetch(&positions(3, 0.0), &positions(3, 10.0)).unwrap();
        c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap();
        assert_eq!(c.fused_capacity(), STEP);
        let made = c.prepare_fused_storage(1, 1, mlx_rs::Dtype::Float32, 2 * STEP).unwrap();
        assert!(made.is_some(), "storage too small for the capacity asked for is made again");
        assert_eq!(c.fused_capacity(), 2 * STEP);
        let (k, v) = c.fused_storage(1, 1, mlx_rs::Dtype::Float32).unwrap();
        assert_eq!(k.shape(), &[1, 1, 2 * STEP, 1]);
        assert_eq!(values(&k)[..4], [0.0, 1.0, 2.0, 0.0]);
        assert_eq!(values(&v)[..3], [10.0, 11.0, 12.0]);
        // Already that large: kept.
        assert!(c.prepare_fused_storage(1, 1, mlx_rs::Dtype::Float32, 2 * STEP).unwrap().is_none());
        assert_eq!(LayerCache::default().fused_capacity(), 0);
    }

    fn positions(t: i32, first: f32) -> Array {
        let data: Vec<f32> = (0..t).map(|i| first + i as f32).collect();
        Array::from_slice(&data, &[1, 1, t, 1])
    }

    fn values(a: &Array) -> Vec<f32> {
        let a = a.contiguous().unwrap();
        a.eval().unwrap();
        a.as_slice::<f32>().to_vec()
    }

    /// A cache with spare room past its offset (a prompt-cache prefix copy keeps room up to the
    /// next STEP) takes an update longer than that room: it grows to hold all of it, and the
    /// kept prefix and the new positions read back in order.
    #[test]
    fn an_update_longer_than_the_spare_room_grows_the_cache_enough() {
        let mut full = LayerCache::default();
        full.update_and_fetch(&positions(300, 0.0), &positions(300, 0.0)).unwrap();
        let mut prefix = full.prefix_copy(153).unwrap();
        assert_eq!((prefix.offset(), prefix.keys.as_ref().unwrap().shape()[2]), (153, 256));
        let (k, v) = prefix.update_and_fetch(&positions(297, 1000.0), &positions(297, 1000.0)).unwrap();
        assert_eq!(prefix.offset(), 450);
        assert!(prefix.keys.as_ref().unwrap().shape()[2] >= 450);
        let want: Vec<f32> = (0..153).map(|i| i as f32).chain((0..297).map(|i| 1000.0 + i as f32)).collect();
        assert_eq!(values(&k), want);
        assert_eq!(values(&v), want);
        // The original is untouched.
        assert_eq!(full.offset(), 300);
    }

    /// Growth from empty and from exactly full rounds up to whole STEPs.
    #[test]
    fn growth_rounds_up_to_whole_steps() {
        let mut c = LayerCache::default();
        c.update_and_fetch(&positions(10, 0.0), &positions(10, 0.0)).unwrap();
        assert_eq!(c.keys.as_ref().unwrap().shape()[2], STEP);
        c.update_and_fetch(&positions(STEP - 10, 10.0), &positions(STEP - 10, 10.0)).unwrap();
        assert_eq!(c.keys.as_ref().unwrap().shape()[2], STEP);
        let (k, _) = c.update_and_fetch(&positions(1, STEP as f32), &positions(1, STEP as f32)).unwrap();
        assert_eq!(c.keys.as_ref().unwrap().shape()[2], 2 * STEP);
        assert_eq!(values(&k), (0..=STEP).map(|i| i as f32).collect::<Vec<_>>());
    }
}
