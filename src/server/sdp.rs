//! What a browser's WebRTC offer asks for: the H.264 format (payload type and
//! `profile-level-id`) that the live view's stream is sent as ([`super::broadcast`]), and
//! whether the offer is well formed enough to hand to webrtcbin ([`check_offer`]).

use gstreamer_sdp as gst_sdp;

/// Media sections an offer may have (a browser's live view offers one video section; a bound
/// for candidates' `sdpMLineIndex` too).
pub(crate) const MAX_MEDIA_SECTIONS: u32 = 16;

/// Attributes a media section may carry once at most (RFC 8866 for the direction, RFC 5888
/// for `mid`, RFC 8839 and RFC 5763 for ICE credentials and the DTLS role).
const ONCE_PER_SECTION: [&str; 4] = ["mid", "ice-ufrag", "ice-pwd", "setup"];

/// The direction attributes, of which a section (and the session) may have one.
const DIRECTIONS: [&str; 4] = ["sendrecv", "sendonly", "recvonly", "inactive"];

/// Refuses an offer that breaks the rules webrtcbin relies on: more than
/// [`MAX_MEDIA_SECTIONS`] media sections, an audio or video section without exactly one
/// direction attribute (JSEP, RFC 8829 5.2.1, has offers state it), the session with two, a
/// section with two of an attribute in [`ONCE_PER_SECTION`], two sections with the same
/// `mid`. GStreamer 1.22's webrtcbin stalls for ever on some such offers (two sections, the
/// second saying `a=recvonly` twice; a section without a direction under a session-level
/// fingerprint). The message names the section and the attribute.
pub(crate) fn check_offer(sdp: &gst_sdp::SDPMessage) -> Result<(), String> {
    if sdp.medias_len() > MAX_MEDIA_SECTIONS {
        return Err(format!(
            "sdp: {} media sections, at most {MAX_MEDIA_SECTIONS} are taken",
            sdp.medias_len()
        ));
    }
    let session_directions = sdp
        .attributes()
        .filter(|a| DIRECTIONS.contains(&a.key()))
        .count();
    if session_directions > 1 {
        return Err(format!(
            "sdp: the session has {session_directions} direction attributes, one is allowed"
        ));
    }
    let mut mids: Vec<&str> = Vec::new();
    for (index, media) in sdp.medias().enumerate() {
        let section = format!(
            "media section {} ({})",
            index + 1,
            media.media().unwrap_or("no media type")
        );
        let count = |key: &str| media.attributes().filter(|a| a.key() == key).count();
        let directions: usize = DIRECTIONS.iter().map(|key| count(key)).sum();
        let is_rtp = matches!(media.media(), Some("audio" | "video"));
        if directions > 1 || (is_rtp && directions == 0) {
            return Err(format!(
                "sdp: {section} has {directions} direction attributes (a=recvonly ...), \
                 one is required"
            ));
        }
        if let Some(key) = ONCE_PER_SECTION.iter().find(|key| count(key) > 1) {
            return Err(format!("sdp: {section} has a={key} more than once"));
        }
        if let Some(mid) = media.attribute_val("mid") {
            if mids.contains(&mid) {
                return Err(format!(
                    "sdp: {section} repeats a=mid:{mid} of an earlier one"
                ));
            }
            mids.push(mid);
        }
    }
    Ok(())
}

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

    #[test]
    fn offers_with_repeated_directions_mids_or_credentials_are_refused_naming_the_section() {
        gst::init().expect("GStreamer starts");
        let section = |mid: &str, extra: &str| {
            format!(
                "m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=recvonly\r\n\
                 a=rtpmap:102 H264/90000\r\na=mid:{mid}\r\na=ice-ufrag:abcd\r\n\
                 a=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\n{extra}"
            )
        };
        let check = |sections: &[String]| {
            let text = format!(
                "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n{}",
                sections.concat()
            );
            check_offer(&gst_sdp::SDPMessage::parse_buffer(text.as_bytes()).expect("parses"))
        };
        assert_eq!(check(&[section("0", ""), section("1", "")]), Ok(()));
        let refused = [
            (
                vec![section("0", ""), section("1", "a=recvonly\r\n")],
                "media section 2 (video) has 2 direction attributes",
            ),
            (
                vec![section("0", "a=sendonly\r\n")],
                "media section 1 (video) has 2 direction attributes",
            ),
            (
                vec![section("0", "").replace("a=recvonly\r\n", "")],
                "media section 1 (video) has 0 direction attributes",
            ),
            (
                vec![section("0", "a=setup:passive\r\n")],
                "media section 1 (video) has a=setup more than once",
            ),
            (
                vec![section("0", ""), section("0", "")],
                "media section 2 (video) repeats a=mid:0",
            ),
            (
                (0..=MAX_MEDIA_SECTIONS)
                    .map(|i| section(&i.to_string(), ""))
                    .collect(),
                "17 media sections, at most 16",
            ),
        ];
        for (sections, expected) in refused {
            let error = check(&sections).expect_err(expected);
            assert!(error.contains(expected), "{error} (expected {expected})");
        }
    }

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
