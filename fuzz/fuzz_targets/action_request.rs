//! A plugin's actions, any values at all (`arbitrary`), through the host's
//! check and the request they become (`Action::validate`, then
//! `actions::to_request_in`): never a panic; a request exactly when the
//! action is valid and the scope allows it; every request stays in the
//! conversation of the event, whatever the plugin put in its fields.

#![no_main]

use arbitrary::Arbitrary;
use digibot_domain::actions::{Refusal, Scope, path_segment, to_request_in};
use digibot_protocol::Action;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    action: Action,
    /// From the event (Digishare), not the plugin; any string.
    conversation_id: String,
    notes_only: bool,
    index: usize,
}

fuzz_target!(|input: Input| {
    let scope = if input.notes_only {
        Scope::NotesOnly
    } else {
        Scope::Everything
    };
    let valid = input.action.validate();
    let allowed = scope == Scope::Everything || matches!(input.action, Action::Note { .. });
    let conversation = input.conversation_id.as_str();
    match to_request_in("fuzz", input.index, conversation, &input.action, scope) {
        Ok(request) => {
            assert!(
                valid.is_ok() && allowed,
                "built a request for {:?}",
                input.action
            );
            let body = request.body.as_object().expect("a JSON object body");
            match request.method.as_str() {
                "POST" => {
                    assert_eq!(request.path, "/v1/messages");
                    assert_eq!(body["conversation_id"], conversation);
                }
                "PUT" => {
                    // The conversation id is the path's one variable
                    // segment, and cannot become `.` or `..`.
                    let segment = path_segment(conversation);
                    assert_eq!(
                        request.path,
                        format!("/v1/conversations/{segment}/attach/participants")
                    );
                    let segments: Vec<&str> = request.path.split('/').collect();
                    assert_eq!(segments.len(), 6, "{}", request.path);
                    assert!(
                        segments.iter().all(|s| *s != "." && *s != ".."),
                        "a dot segment: {}",
                        request.path
                    );
                    assert!(!request.path.contains(['?', '#']));
                }
                other => panic!("method {other}"),
            }
            serde_json::to_vec(&request.body).expect("the body serializes");
        }
        Err(rejected) => {
            assert_eq!(rejected.index, input.index);
            match (&rejected.reason, valid) {
                (Refusal::HumanInCharge, _) => assert!(!allowed),
                (Refusal::Limit(e), Err(v)) => assert_eq!(*e, v),
                (Refusal::Limit(e), Ok(())) => panic!("refused a valid action: {e}"),
            }
            assert!(!rejected.to_string().is_empty());
        }
    }
});
