//! The label's text: a 5x7 bitmap font for the characters labels use, drawn on a dark box.

/// 5x7 glyphs (one byte per row, low 5 bits, leftmost pixel in bit 4) for the characters labels use.
fn glyph(c: char) -> [u8; 7] {
    match c {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0; 7],
    }
}

/// What [`draw_text`] asks of a pixel.
#[derive(Clone, Copy)]
pub(super) enum Paint {
    /// Part of the dark box behind the text: darken it.
    Shade,
    /// Part of a letter: the text colour.
    Ink,
}

/// Writes `text` in the top-left corner (each font pixel a square of a side that grows with the
/// image), on a dark box so it reads on any image, by calling `paint` for each pixel. Clipped at
/// the image border.
pub(super) fn draw_text(
    width: usize,
    height: usize,
    text: &str,
    mut paint: impl FnMut(usize, usize, Paint),
) {
    let scale = (height / 160).clamp(1, 6);
    let (left, top) = (4 * scale, 4 * scale);
    let advance = 6 * scale;
    let box_right = (left + text.chars().count() * advance + scale).min(width);
    let box_bottom = (top + 9 * scale).min(height);
    for y in top.saturating_sub(scale)..box_bottom {
        for x in left.saturating_sub(scale)..box_right {
            paint(x, y, Paint::Shade);
        }
    }
    for (index, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (row, bits) in rows.iter().enumerate() {
            for column in 0..5 {
                if bits & (0x10 >> column) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = left + index * advance + column * scale + dx;
                        let y = top + row * scale + dy;
                        if x < width && y < height {
                            paint(x, y, Paint::Ink);
                        }
                    }
                }
            }
        }
    }
}
