//! llama.cpp's `permute` of q/k rows and its inverse, on whole rows of bytes so quantized
//! blocks (which run along a row) stay intact. A leaf: the architectures say when it
//! applies ([`crate::models::ArchSpec::llama_cpp_permutes_qk`]); base weights and GGUF
//! adapters apply it.

/// Row moves of llama.cpp's `permute` for `rows` rows in `heads` heads: `(hf, gguf)`
/// pairs, GGUF row `h*hd + 2i + j` holding HF row `h*hd + j*hd/2 + i`.
fn row_pairs(rows: usize, heads: usize) -> std::result::Result<impl Iterator<Item = (usize, usize)>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!("{rows} rows do not split into {heads} heads of an even size"));
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    Ok((0..heads).flat_map(move |h| (0..half).flat_map(move |i| (0..2).map(move |j| (h * head_dim + j * half + i, h * head_dim + 2 * i + j)))))
}

/// Moves rows of `data` (`rows` equal rows) from `from` to `to` positions of the pairs.
fn move_rows(data: &[u8], rows: usize, heads: usize, to_gguf: bool) -> std::result::Result<Vec<u8>, String> {
    let row_bytes = data.len() / rows.max(1);
    let mut out = vec![0u8; data.len()];
    for (hf, gguf) in row_pairs(rows, heads)? {
        let (src, dst) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
        out[dst * row_bytes..(dst + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    Ok(out)
}

/// Undoes llama.cpp's `permute`: GGUF rows back in Hugging Face order. Used for base q/k
/// weights and GGUF adapters' q/k `lora_b`.
pub fn unpermute_row_bytes(data: &[u8], rows: usize, heads: usize) -> std::result::Result<Vec<u8>, String> {
    move_rows(data, rows, heads, false)
}

/// llama.cpp's `permute`: Hugging Face rows in the order its converter writes them (what
/// a GGUF adapter written for a Llama base holds).
pub fn permute_row_bytes(data: &[u8], rows: usize, heads: usize) -> std::result::Result<Vec<u8>, String> {
    move_rows(data, rows, heads, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_permute_and_matches_llama_cpp() {
        // 2 heads of dim 4, one byte per row: HF row r holds byte r.
        let hf: Vec<u8> = (0..8).collect();
        let gguf = permute_row_bytes(&hf, 8, 2).unwrap();
        // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2) interleaves each head's halves.
        assert_eq!(gguf, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_row_bytes(&gguf, 8, 2).unwrap(), hf);
        assert!(unpermute_row_bytes(&gguf, 8, 3).is_err());
    }
}
