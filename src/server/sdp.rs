//! What a browser's WebRTC offer asks for: the H.264 format (payload type and
//! `profile-level-id`) that the live view's stream is sent as ([`super::broadcast`]).

use gstreamer_sdp as gst_sdp;

/// The offer's H.264 format that our stream is sent as: its payload type and its
/// `profile-level-id` (which the payloader's caps are made to carry, see `answer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct H264Format {
    pub(crate) payload_type: u32,
    pub(crate) profile_level_id: String,
}

/// The offer's H.264 format (packetization mode 1) that our constrained-baseline stream fits
/// best: a constrained-baseline one (`42e0..`) when offered, else the first. Only what RFC 6184
/// allows counts: video over RTP, a dynamic payload type (96-127), the 90 kHz clock.
pub(crate) fn h264_format(sdp: &gst_sdp::SDPMessage) -> Option<H264Format> {
    let media = sdp
        .medias()
        .find(|m| m.media() == Some("video") && m.proto().is_some_and(|p| p.contains("RTP/")))?;
    let mut candidates: Vec<H264Format> = Vec::new();
    for attribute in media.attributes() {
        if attribute.key() != "rtpmap" {
            continue;
        }
        let value = attribute.value()?;
        let (pt, codec) = value.split_once(' ')?;
        if !codec.eq_ignore_ascii_case("H264/90000") {
            continue;
        }
        let Some(payload_type) = pt.parse::<u32>().ok().filter(|pt| (96..=127).contains(pt)) else {
            continue;
        };
        let fmtp = media
            .attributes()
            .filter(|a| a.key() == "fmtp")
            .filter_map(|a| a.value())
            .find(|v| v.split_once(' ').is_some_and(|(p, _)| p == pt))
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !fmtp.contains("packetization-mode=1") {
            continue;
        }
        let profile_level_id = fmtp
            .split([' ', ';'])
            .find_map(|pair| pair.trim().strip_prefix("profile-level-id="))
            .filter(|id| id.len() == 6 && id.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap_or("42e01f")
            .to_string();
        candidates.push(H264Format {
            payload_type,
            profile_level_id,
        });
    }
    let baseline = candidates
        .iter()
        .position(|format| format.profile_level_id.starts_with("42e0"));
    let chosen = baseline.unwrap_or(0);
    (chosen < candidates.len()).then(|| candidates.swap_remove(chosen))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gstreamer as gst;

    fn offer(formats: &[(u32, &str, &str)]) -> gst_sdp::SDPMessage {
        gst::init().expect("GStreamer starts");
        let payload_types: Vec<String> = formats.iter().map(|(pt, _, _)| pt.to_string()).collect();
        let mut text = format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF {}\r\nc=IN IP4 0.0.0.0\r\n",
            payload_types.join(" ")
        );
        for (pt, codec, fmtp) in formats {
            text.push_str(&format!("a=rtpmap:{pt} {codec}/90000\r\n"));
            if !fmtp.is_empty() {
                text.push_str(&format!("a=fmtp:{pt} {fmtp}\r\n"));
            }
        }
        gst_sdp::SDPMessage::parse_buffer(text.as_bytes()).expect("a valid SDP")
    }

    #[test]
    fn the_constrained_baseline_h264_format_of_an_offer_is_chosen() {
        let chrome = offer(&[
            (96, "VP8", ""),
            (
                102,
                "H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            ),
            (
                104,
                "H264",
                "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f",
            ),
            (
                106,
                "H264",
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            ),
        ]);
        let chosen = h264_format(&chrome).expect("an H.264 format");
        assert_eq!(chosen.payload_type, 106);
        assert_eq!(chosen.profile_level_id, "42e01f");

        let main_only = offer(&[(100, "H264", "packetization-mode=1;profile-level-id=4d001f")]);
        let chosen = h264_format(&main_only).expect("an H.264 format");
        assert_eq!(
            (chosen.payload_type, chosen.profile_level_id.as_str()),
            (100, "4d001f")
        );

        assert_eq!(h264_format(&offer(&[(96, "VP8", "")])), None);
        assert_eq!(
            h264_format(&offer(&[(97, "H264", "packetization-mode=0")])),
            None,
            "mode 0 (one NAL unit per packet) does not fit"
        );
        assert_eq!(
            h264_format(&offer(&[(1, "H264", "packetization-mode=1")])),
            None,
            "a static payload type is not H.264's"
        );
        let odd_clock = gst_sdp::SDPMessage::parse_buffer(
            b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 H264/1\r\na=fmtp:96 packetization-mode=1\r\n",
        )
        .expect("parses");
        assert_eq!(
            h264_format(&odd_clock),
            None,
            "H.264 runs on a 90 kHz clock"
        );
        let not_rtp = gst_sdp::SDPMessage::parse_buffer(
            b"v=0\r\nm=video 9 X 96\r\na=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=1\r\n",
        )
        .expect("parses");
        assert_eq!(h264_format(&not_rtp), None, "not RTP");
    }
}
