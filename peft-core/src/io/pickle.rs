//! `adapter_model.bin`: the tensors of a PEFT adapter saved with
//! `save_pretrained(safe_serialization=False)` (PEFT's default before 0.7),
//! which is `torch.save` of a dict `{key: tensor}`: a zip archive holding
//! `<name>/data.pkl` (the dict, pickled) and one `<name>/data/<n>` entry
//! of raw little-endian bytes per storage.
//!
//! Nothing in the file is executed. The pickle is read by candle's
//! interpreter ([`candle_core::pickle::Stack`]), which only builds values
//! from the opcodes: a `GLOBAL` becomes a name (`Object::Class`), a
//! `REDUCE` a description of a call (`Object::Reduce`) that nothing calls;
//! it imports nothing and runs nothing. This module then accepts exactly
//! one shape of result, a dict from strings to PyTorch's tensor record
//! (`torch._utils._rebuild_tensor_v2` over a `FloatStorage`,
//! `DoubleStorage`, `HalfStorage` or `BFloat16Storage`), and refuses
//! anything else (another global, a nested dict, a number, a list) with
//! [`PeftError::Pickle`] naming the file and the key.
//!
//! Before candle's interpreter runs, [`scan`] walks the opcodes once with
//! a shadow stack of sizes: opcodes candle does not know, arguments that
//! run past the end, and values that grow too large or too deep (a few
//! hundred bytes of memo references can describe 2⁴⁰ values, a chain of
//! `TUPLE1` a value deep enough to overflow the stack when dropped) are
//! refused first, so the interpreter only sees pickles of bounded size.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{PeftError, Result};

/// The most values one pickled value may hold (a PEFT state dict holds
/// about 20 per tensor).
const MAX_VALUES: u64 = 50_000_000;
/// The deepest nesting accepted (a state dict is 5 deep).
const MAX_DEPTH: u32 = 64;

/// The tensors of the PyTorch file `bytes` (read from `path`, named in
/// errors), by key, on `device`. Tensors of an integer or boolean storage
/// are refused ([`PeftError::WrongDtype`]), as in safetensors files.
pub(crate) fn read_tensors(bytes: &[u8], path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let refuse = |key: Option<&str>, problem: String| PeftError::Pickle {
        path: path.to_path_buf(),
        key: key.map(str::to_owned),
        problem,
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        let legacy = if bytes.first() == Some(&0x80) {
            " (a bare pickle: PyTorch's format before 1.6, which is not read)"
        } else {
            ""
        };
        refuse(None, format!("not a PyTorch zip archive{legacy}: {e}"))
    })?;
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let pickles: Vec<&String> = names
        .iter()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .collect();
    let [pickle_name] = pickles.as_slice() else {
        return Err(refuse(
            None,
            format!(
                "a PyTorch file holds one data.pkl, this archive {}",
                if pickles.is_empty() {
                    "has none".to_owned()
                } else {
                    format!("has {}", pickles.len())
                }
            ),
        ));
    };
    let prefix = pickle_name.strip_suffix("data.pkl").unwrap_or_default().to_owned();
    let mut read_entry = |name: &str, expected: Option<u64>| -> Result<Vec<u8>> {
        let mut entry = archive
            .by_name(name)
            .map_err(|e| refuse(None, format!("entry `{name}`: {e}")))?;
        if let Some(expected) = expected {
            if entry.size() != expected {
                return Err(refuse(
                    None,
                    format!(
                        "entry `{name}` holds {} bytes, its tensor needs {expected}",
                        entry.size()
                    ),
                ));
            }
        }
        let size = entry.size();
        let mut data = Vec::new();
        entry
            .by_ref()
            .take(size)
            .read_to_end(&mut data)
            .map_err(|e| refuse(None, format!("entry `{name}`: {e}")))?;
        Ok(data)
    };
    if names.iter().any(|n| *n == format!("{prefix}byteorder")) {
        let order = read_entry(&format!("{prefix}byteorder"), None)?;
        if order.trim_ascii() != b"little" {
            return Err(refuse(
                None,
                format!(
                    "byte order `{}`: only little-endian files are read",
                    String::from_utf8_lossy(&order)
                ),
            ));
        }
    }
    let pickle = read_entry(pickle_name, None)?;
    scan(&pickle).map_err(|problem| refuse(None, format!("{pickle_name}: {problem}")))?;
    let mut stack = Stack::empty();
    let mut reader: &[u8] = &pickle;
    stack
        .read_loop(&mut reader)
        .map_err(|e| refuse(None, format!("{pickle_name}: {e}")))?;
    let object = stack
        .finalize()
        .map_err(|e| refuse(None, format!("{pickle_name}: {e}")))?;
    let Object::Dict(entries) = object else {
        return Err(refuse(
            None,
            format!("holds {}, not a dict of tensors", describe(&object)),
        ));
    };

    let mut tensors = BTreeMap::new();
    for (key, value) in entries {
        let Object::Unicode(key) = key else {
            return Err(refuse(None, format!("a dict key is {}, not a string", describe(&key))));
        };
        if tensors.contains_key(&key) {
            return Err(refuse(Some(&key), "appears twice in the dict".to_owned()));
        }
        let record = TensorRecord::of(value).map_err(|problem| refuse(Some(&key), problem))?;
        let dtype = match record.storage_class.as_str() {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            other => {
                let found = match other {
                    "LongStorage" => "i64",
                    "IntStorage" => "i32",
                    "ShortStorage" => "i16",
                    "CharStorage" => "i8",
                    "ByteStorage" => "u8",
                    "BoolStorage" => "bool",
                    _ => return Err(refuse(Some(&key), format!("storage type torch.{other} is not read"))),
                };
                return Err(PeftError::WrongDtype {
                    key,
                    found: found.to_owned(),
                });
            }
        };
        let storage_bytes = record
            .storage_numel
            .checked_mul(dtype.size_in_bytes())
            .ok_or_else(|| refuse(Some(&key), format!("a storage of {} values", record.storage_numel)))?;
        let data = read_entry(
            &format!("{prefix}data/{}", record.storage_key),
            Some(storage_bytes as u64),
        )
        .map_err(|e| match e {
            PeftError::Pickle { problem, .. } => refuse(Some(&key), problem),
            other => other,
        })?;
        let tensor = record
            .tensor(&data, dtype)
            .map_err(|problem| refuse(Some(&key), problem))?
            .to_device(device)
            .map_err(|e| refuse(Some(&key), e.to_string()))?;
        tensors.insert(key, tensor);
    }
    Ok(tensors)
}

/// One tensor as `torch.save` pickles it: `_rebuild_tensor_v2(storage,
/// offset, size, stride, ...)`, the storage a persistent id
/// `("storage", torch.<Type>Storage, key, location, numel)`.
struct TensorRecord {
    storage_class: String,
    storage_key: String,
    storage_numel: usize,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRecord {
    fn of(value: Object) -> std::result::Result<Self, String> {
        let not_a_tensor = |value: &Object| format!("holds {}, not a tensor", describe(value));
        let Object::Reduce { callable, args } = &value else {
            return Err(not_a_tensor(&value));
        };
        let is_rebuild = matches!(&**callable, Object::Class { module_name, class_name }
            if module_name == "torch._utils" && class_name == "_rebuild_tensor_v2");
        let Object::Tuple(args) = &**args else {
            return Err(not_a_tensor(&value));
        };
        if !is_rebuild || args.len() < 4 {
            return Err(not_a_tensor(&value));
        }
        let malformed = |what: &str| format!("a tensor record whose {what} is malformed");
        let Object::PersistentLoad(storage) = &args[0] else {
            return Err(malformed("storage"));
        };
        let (storage_class, storage_key, storage_numel) = match &**storage {
            Object::Tuple(id) => match id.as_slice() {
                [Object::Unicode(tag), Object::Class {
                    module_name,
                    class_name,
                }, Object::Unicode(key), _, numel]
                    if tag == "storage" && module_name == "torch" =>
                {
                    (
                        class_name.clone(),
                        key.clone(),
                        count(numel).ok_or_else(|| malformed("storage size"))?,
                    )
                }
                _ => return Err(malformed("storage")),
            },
            _ => return Err(malformed("storage")),
        };
        let dims = |value: &Object, what: &str| match value {
            Object::Tuple(items) => items
                .iter()
                .map(count)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed(what)),
            _ => Err(malformed(what)),
        };
        let record = TensorRecord {
            storage_class,
            storage_key,
            storage_numel,
            offset: count(&args[1]).ok_or_else(|| malformed("offset"))?,
            size: dims(&args[2], "size")?,
            stride: dims(&args[3], "stride")?,
        };
        if record.size.len() != record.stride.len() {
            return Err(malformed("stride"));
        }
        Ok(record)
    }

    /// The tensor this record describes in the storage `data` of `dtype`:
    /// `size` read with `stride` from `offset`, every index inside the storage.
    fn tensor(&self, data: &[u8], dtype: DType) -> std::result::Result<Tensor, String> {
        let numel = self
            .size
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("shape {:?} has more values than can be addressed", self.size))?;
        let storage =
            Tensor::from_raw_buffer(data, dtype, &[self.storage_numel], &Device::Cpu).map_err(|e| e.to_string())?;
        if numel == 0 {
            return Tensor::zeros(self.size.as_slice(), dtype, &Device::Cpu).map_err(|e| e.to_string());
        }
        let last = self
            .size
            .iter()
            .zip(&self.stride)
            .try_fold(self.offset, |end, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|step| end.checked_add(step))
            });
        if last.is_none_or(|last| last >= self.storage_numel) || numel > self.storage_numel {
            return Err(format!(
                "shape {:?} with strides {:?} from offset {} reads outside its storage of {} values",
                self.size, self.stride, self.offset, self.storage_numel
            ));
        }
        let mut contiguous = vec![1usize; self.size.len()];
        for i in (0..self.size.len().saturating_sub(1)).rev() {
            contiguous[i] = contiguous[i + 1] * self.size[i + 1];
        }
        let dense = self
            .size
            .iter()
            .zip(self.stride.iter().zip(&contiguous))
            .all(|(&d, (&s, &c))| d == 1 || s == c);
        let flat = if dense {
            storage.narrow(0, self.offset, numel)
        } else {
            // Any other layout (a transpose, a slice): gather the values.
            let mut indices = Vec::with_capacity(numel);
            let mut at = vec![0usize; self.size.len()];
            for _ in 0..numel {
                indices.push((self.offset + at.iter().zip(&self.stride).map(|(&i, &s)| i * s).sum::<usize>()) as u32);
                for axis in (0..at.len()).rev() {
                    at[axis] += 1;
                    if at[axis] < self.size[axis] {
                        break;
                    }
                    at[axis] = 0;
                }
            }
            Tensor::new(indices, &Device::Cpu).and_then(|i| storage.index_select(&i, 0))
        };
        flat.and_then(|t| t.reshape(self.size.as_slice()))
            .map_err(|e| e.to_string())
    }
}

/// A non-negative pickled integer.
fn count(value: &Object) -> Option<usize> {
    match value {
        Object::Int(n) => usize::try_from(*n).ok(),
        Object::Long(n) => usize::try_from(*n).ok(),
        _ => None,
    }
}

/// A pickled value in a few words, for messages.
fn describe(value: &Object) -> String {
    match value {
        Object::Class {
            module_name,
            class_name,
        } => format!("the global `{module_name}.{class_name}`"),
        Object::Reduce { callable, .. } | Object::Build { callable, .. } => match &**callable {
            Object::Class {
                module_name,
                class_name,
            } => format!("a call of `{module_name}.{class_name}`"),
            _ => "a call".to_owned(),
        },
        Object::Int(n) => format!("the integer {n}"),
        Object::Long(n) => format!("the integer {n}"),
        Object::Float(x) => format!("the number {x}"),
        Object::Unicode(_) => "a string".to_owned(),
        Object::Bool(b) => format!("the boolean {b}"),
        Object::None => "None".to_owned(),
        Object::Tuple(_) => "a tuple".to_owned(),
        Object::List(_) => "a list".to_owned(),
        Object::Mark => "a mark".to_owned(),
        Object::Dict(_) => "a dict".to_owned(),
        Object::PersistentLoad(_) => "a persistent id".to_owned(),
    }
}

/// A value on the shadow stack of [`scan`]: how many values it holds and
/// how deep it nests; `None` for a mark.
type Shape = Option<(u64, u32)>;

/// Walks the opcodes of `pickle` without building anything, refusing what
/// candle's interpreter could not read safely: an opcode it does not know,
/// an argument past the end, a value of more than [`MAX_VALUES`] values or
/// nested deeper than [`MAX_DEPTH`], a stack or memo used wrongly.
fn scan(pickle: &[u8]) -> std::result::Result<(), String> {
    let mut stack: Vec<Shape> = Vec::new();
    let mut memo: BTreeMap<u32, (u64, u32)> = BTreeMap::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let bytes = at
            .checked_add(n)
            .and_then(|end| pickle.get(*at..end))
            .ok_or_else(|| format!("an opcode's argument at byte {} runs past the end", *at))?;
        *at += n;
        Ok(bytes)
    };
    let pop = |stack: &mut Vec<Shape>| -> std::result::Result<(u64, u32), String> {
        stack
            .pop()
            .flatten()
            .ok_or_else(|| "the pickle takes a value from an empty stack".to_owned())
    };
    let pop_to_mark = |stack: &mut Vec<Shape>| -> std::result::Result<Vec<(u64, u32)>, String> {
        let mark = stack
            .iter()
            .rposition(Option::is_none)
            .ok_or_else(|| "the pickle closes a mark it never opened".to_owned())?;
        let items = stack.split_off(mark + 1).into_iter().flatten().collect();
        stack.pop();
        Ok(items)
    };
    let joined = |items: &[(u64, u32)]| -> (u64, u32) {
        let values = items.iter().fold(1u64, |n, (v, _)| n.saturating_add(*v));
        let depth = items.iter().map(|(_, d)| d + 1).max().unwrap_or(1);
        (values, depth)
    };
    loop {
        let op = *take(&mut at, 1)?.first().unwrap_or(&0);
        let leaf = Some((1, 1));
        match op {
            0x80 => {
                take(&mut at, 1)?;
            }
            b'.' => return Ok(()),
            b'c' => {
                for _ in 0..2 {
                    let line = pickle[at..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or("a GLOBAL's name runs past the end")?;
                    at += line + 1;
                }
                stack.push(leaf);
            }
            b'X' => {
                let length = u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap_or_default());
                take(&mut at, length as usize)?;
                stack.push(leaf);
            }
            b'K' | b'M' | b'J' | b'G' => {
                take(
                    &mut at,
                    [1, 2, 4, 8][[b'K', b'M', b'J', b'G'].iter().position(|&o| o == op).unwrap_or(0)],
                )?;
                stack.push(leaf);
            }
            0x8a => {
                let n = take(&mut at, 1)?[0];
                if n > 8 {
                    return Err(format!("an integer of {n} bytes (at most 8 are read)"));
                }
                take(&mut at, n as usize)?;
                stack.push(leaf);
            }
            b')' | b']' | b'}' | b'd' | b'N' | 0x88 | 0x89 => stack.push(leaf),
            b'(' => stack.push(None),
            b'q' | b'r' => {
                let id = if op == b'q' {
                    u32::from(take(&mut at, 1)?[0])
                } else {
                    u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap_or_default())
                };
                let top = stack.last().copied().flatten().ok_or("the pickle memoizes nothing")?;
                memo.insert(id, top);
            }
            b'h' | b'j' => {
                let id = if op == b'h' {
                    u32::from(take(&mut at, 1)?[0])
                } else {
                    u32::from_le_bytes(take(&mut at, 4)?.try_into().unwrap_or_default())
                };
                let value = *memo
                    .get(&id)
                    .ok_or_else(|| format!("memo {id} is read before it is written"))?;
                stack.push(Some(value));
            }
            0x85..=0x87 => {
                let mut items = Vec::new();
                for _ in 0..(op - 0x84) {
                    items.push(pop(&mut stack)?);
                }
                stack.push(Some(joined(&items)));
            }
            b't' => {
                let items = pop_to_mark(&mut stack)?;
                stack.push(Some(joined(&items)));
            }
            b'R' | 0x81 | b'b' => {
                let items = [pop(&mut stack)?, pop(&mut stack)?];
                stack.push(Some(joined(&items)));
            }
            b'Q' => {
                let item = pop(&mut stack)?;
                stack.push(Some(joined(&[item])));
            }
            b'a' | b's' | b'e' | b'u' => {
                let mut items = match op {
                    b'a' => vec![pop(&mut stack)?],
                    b's' => vec![pop(&mut stack)?, pop(&mut stack)?],
                    _ => pop_to_mark(&mut stack)?,
                };
                items.push(pop(&mut stack)?);
                stack.push(Some(joined(&items)));
            }
            other => {
                return Err(format!(
                    "opcode {:?} (0x{other:02x}) at byte {} is not one torch.save writes",
                    other as char,
                    at - 1
                ))
            }
        }
        if let Some(Some((values, depth))) = stack.last() {
            if *values > MAX_VALUES || *depth > MAX_DEPTH {
                return Err(format!(
                    "a value holding more than {MAX_VALUES} values or nested deeper than {MAX_DEPTH} (at byte {at})"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::scan;

    #[test]
    fn the_scan_refuses_what_the_interpreter_should_not_see() {
        // A dict {"a": 1}.
        assert_eq!(scan(b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s."), Ok(()));
        // 2^40 values by the memo.
        let mut bomb = b"\x80\x02]q\x01".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"h\x01h\x01\x86q\x01");
        }
        bomb.push(b'.');
        assert!(scan(&bomb).unwrap_err().contains("more than"));
        // A chain of TUPLE1.
        let mut deep = b"\x80\x02N".to_vec();
        deep.extend(std::iter::repeat_n(0x85, 100_000));
        deep.push(b'.');
        assert!(scan(&deep).unwrap_err().contains("deeper"));
        // An argument past the end, an opcode torch.save does not write, a long integer.
        assert!(scan(b"\x80\x02X\xff\xff\xff\xffab")
            .unwrap_err()
            .contains("past the end"));
        assert!(scan(b"\x80\x02S'a'\n.").unwrap_err().contains("opcode 'S'"));
        assert!(scan(b"\x8a\x40").unwrap_err().contains("64 bytes"));
        assert!(scan(b"s.").unwrap_err().contains("empty stack"));
        assert!(scan(b"h\x05.").unwrap_err().contains("memo 5"));
        assert!(scan(b"\x80\x02").unwrap_err().contains("past the end"));
    }
}
